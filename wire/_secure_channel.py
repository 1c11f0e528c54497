"""The secure channel: one connection's Noise session as a sans-IO state machine.

Like h11's ``Connection``: it never touches a socket. Feed it the frames that
arrived (`receive_frame`), it returns events and queues frames to send
(`frames_to_send`); `send` and `close` return the frames for an outgoing
message. Timeouts belong to the caller (it has a clock; this class does not).

Lifecycle::

    HANDSHAKING --(handshake done, peer certificate verified)--> OPEN
    OPEN --(close sent or received)--> CLOSED
    any --(WireError)--> ERROR   (terminal: every later call raises)

Two handshake modes share one listener (issue 20). The initiator's first frame
is a mode byte followed by its ephemeral key; the byte is also mixed into the
prologue (``PROLOGUE + mode byte``), so changing it in flight fails the handshake.
Its low four bits are the mode, its high four the cipher suite (issue 17)::

    suite  0x00  ChaChaPoly (ChaCha20-Poly1305)       Noise_..._ChaChaPoly_BLAKE2b
           0x10  AESGCM (AES-256-GCM)                 Noise_..._AESGCM_BLAKE2b

A node takes the suites of `default_suites`: both where this CPU runs AES-GCM clearly
faster than ChaCha20-Poly1305 (AES instructions), else ChaChaPoly alone. It dials with
the first of them (`preferred_suite`); a responder without fast AES refuses AES-GCM at
message 1 (`SuiteRefused`, close code 4002) and the initiator dials again with ChaChaPoly,
the suite every node takes - so AES-GCM runs only where both ends are fast at it (TLS 1.3
servers choose the same way). Both are Noise cipher functions with 16-byte tags, so frame
sizes do not depend on the choice.

    DEVICE  0x01  Noise_XXpsk3_25519_ChaChaPoly_BLAKE2b, between devices of one identity
    -> mode, e                 payload: empty (clear)
    <- e, ee, s, es            payload: empty (readable by anyone who sent message 1)
    -> s, se, psk              payload: initiator's DeviceCertificate (keys include the PSK)
    <- first transport message: responder's DeviceCertificate

    STORAGE 0x02  Noise_XX_25519_ChaChaPoly_BLAKE2b, towards strangers (storage peers)
    -> mode, e                 payload: empty
    <- e, ee, s, es            payload: responder's storage certificate
    -> s, se                   payload: initiator's storage certificate

In device mode only a holder of the PSK (derived from the identity seed) can
read message 3 or produce one the responder accepts, and the responder shows its
certificate only after message 3 decrypted: a stranger completes neither side
and sees no certificate, only a per-device Noise static key. Both certificates
must name the same identity as ours. In storage mode each side presents its
`DeviceCredentials.for_storage` (a node's per-node storage key, not its identity).

Each side verifies the other's certificate as soon as it can decrypt it, so a
peer with a bad or unexpected identity never gets to deliver an application
message. Transport messages use Noise's implicit counter nonces: any replayed,
reordered, dropped, truncated or modified frame fails authentication and the
channel moves to ERROR. Both directions rekey (spec 11.3) every
`REKEY_INTERVAL` messages; since frames are delivered in order, both ends
count the same messages and no signalling is needed.
"""

from __future__ import annotations

import enum
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from wire._errors import (
    DecryptError,
    DeviceRefused,
    FrameError,
    HandshakeError,
    IdentityError,
    SuiteRefused,
    WireError,
)
from wire._framing import (
    CHUNK_HEADER_BYTES,
    DEFAULT_MAX_MESSAGE_SIZE,
    MAX_CHUNK_PAYLOAD,
    MAX_FRAME_SIZE,
    Reassembler,
    ReassemblyBudget,
    chunk_encoded,
)
from wire._handshake import DeviceCredentials, PeerIdentity, verify_peer
from wire._messages import BASE_REGISTRY, CLOSE, MAX_CLOSE_REASON_BYTES, Message, SchemaRegistry
from wire._noise import (
    CIPHERS,
    DHLEN,
    TAGLEN,
    CipherState,
    HandshakeState,
    NoiseProtocol,
)

__all__ = [
    "DEVICE_NOISE_PROTOCOL_NAME",
    "NOISE_PROTOCOL_NAME",
    "PROLOGUE",
    "REKEY_INTERVAL",
    "ChannelState",
    "CloseReceived",
    "Event",
    "HandshakeComplete",
    "MessageReceived",
    "Mode",
    "SecureChannel",
    "Suite",
    "default_suites",
    "preferred_suite",
    "protocol_name",
]

NOISE_PROTOCOL_NAME = "Noise_XX_25519_ChaChaPoly_BLAKE2b"
DEVICE_NOISE_PROTOCOL_NAME = "Noise_XXpsk3_25519_ChaChaPoly_BLAKE2b"
# Mixed into the handshake hash: a peer speaking another protocol or version
# fails the handshake instead of misparsing our messages later.
PROLOGUE = b"dmgn/1"
# Precedent: Lightning (BOLT 8) rekeys every 1000 messages. Cost here is one
# cipher call per 1000 messages; benefit is forward secrecy within a session.
REKEY_INTERVAL = 1000
# Our certificate payload is ~125 bytes; 1 KiB leaves room for future fields while
# keeping an unauthenticated peer from making us decrypt much.
MAX_HANDSHAKE_PAYLOAD = 1024
_MAX_HANDSHAKE_FRAME = DHLEN + (DHLEN + TAGLEN) + MAX_HANDSHAKE_PAYLOAD + TAGLEN
# The first message is exactly the mode byte and the initiator's ephemeral key: its
# payload must be empty because anyone can read it. With a PSK, Noise mixes ``e`` into the
# key (spec 9.2), so in device mode that empty payload carries a tag.
_FIRST_MESSAGE_SIZE = {0x01: 1 + DHLEN + TAGLEN, 0x02: 1 + DHLEN}
_MODE_BITS = 0x0F
_SUITE_BITS = 0xF0
# The responder's certificate as the first transport message of device mode.
_MAX_CERTIFICATE_FRAME = MAX_HANDSHAKE_PAYLOAD + TAGLEN


class Mode(enum.IntEnum):
    """The first byte's low bits: which handshake the initiator asks for."""

    DEVICE = 0x01
    STORAGE = 0x02


class Suite(enum.IntEnum):
    """The first byte's high bits: the Noise cipher functions of the session."""

    CHACHAPOLY = 0x00
    AESGCM = 0x10

    @property
    def cipher_name(self) -> str:
        return "ChaChaPoly" if self is Suite.CHACHAPOLY else "AESGCM"


def protocol_name(mode: Mode, suite: Suite = Suite.CHACHAPOLY) -> str:
    """The Noise protocol name of a handshake (`NOISE_PROTOCOL_NAME` is storage/ChaChaPoly)."""
    pattern = "XXpsk3" if mode is Mode.DEVICE else "XX"
    return f"Noise_{pattern}_25519_{suite.cipher_name}_BLAKE2b"


_PROTOCOLS = {
    (mode, suite): NoiseProtocol.from_name(protocol_name(mode, suite))
    for mode in Mode
    for suite in Suite
}


@functools.cache
def default_suites() -> tuple[Suite, ...]:
    """The suites this node takes, the one it dials with first: (AESGCM, CHACHAPOLY) where
    this CPU runs AES-256-GCM clearly faster than ChaCha20-Poly1305 (AES instructions: 5 us
    against 18 us per 64 KiB on the 2-core box of issue 17), else (CHACHAPOLY,): software
    AES is several times slower than ChaCha20 and not always constant-time, so a node
    without fast AES does not let anyone make it run AES.

    Measured once per process (a few milliseconds at most, the samples of the two ciphers
    interleaved so a burst of load elsewhere slows both) rather than read from CPU flags:
    the same code is right on x86, ARM and whatever flags we do not know."""
    sample, nonce, key = bytes(16 * 1024), bytes(12), bytes(32)
    try:
        chacha, aes = CIPHERS["ChaChaPoly"].aead(key), CIPHERS["AESGCM"].aead(key)
    except Exception:  # an OpenSSL without AES-GCM (or a FIPS build's refusal): ChaCha only
        return (Suite.CHACHAPOLY,)
    best = {"chacha": float("inf"), "aes": float("inf")}
    for _ in range(5):
        for name, aead in (("chacha", chacha), ("aes", aes)):
            start = time.perf_counter()
            for _ in range(4):
                aead.encrypt(nonce, sample, b"")
            best[name] = min(best[name], time.perf_counter() - start)
    if best["aes"] < 0.8 * best["chacha"]:
        return (Suite.AESGCM, Suite.CHACHAPOLY)
    return (Suite.CHACHAPOLY,)


def preferred_suite() -> Suite:
    """The suite this node dials with (the first of `default_suites`)."""
    return default_suites()[0]


_T = TypeVar("_T")


class ChannelState(enum.Enum):
    HANDSHAKING = "handshaking"
    OPEN = "open"
    CLOSED = "closed"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    peer: PeerIdentity
    handshake_hash: bytes


@dataclass(frozen=True, slots=True)
class MessageReceived:
    message: Message


@dataclass(frozen=True, slots=True)
class CloseReceived:
    code: int
    reason: str


Event = HandshakeComplete | MessageReceived | CloseReceived


class _Direction:
    """One direction's cipher plus the rekey schedule."""

    __slots__ = ("_cipher", "_count", "_rekey_interval")

    def __init__(self, cipher: CipherState, rekey_interval: int) -> None:
        self._cipher = cipher
        self._rekey_interval = rekey_interval
        self._count = 0

    def encrypt(self, plaintext: bytes | memoryview) -> bytes:
        frame = self._cipher.encrypt_with_ad(b"", plaintext)
        self._count += 1
        if self._count == self._rekey_interval:
            self._tick_over()
        return frame

    def decrypt(self, frame: bytes | memoryview) -> bytes:
        plaintext = self._cipher.decrypt_with_ad(b"", frame)
        self._count += 1
        if self._count == self._rekey_interval:
            self._tick_over()
        return plaintext

    def _tick_over(self) -> None:
        self._cipher.rekey()
        self._count = 0


class SecureChannel:
    """A Noise XX(psk3) + identity-bound session for one connection.

    ``mode`` is the handshake an initiator asks for (a responder answers in the mode
    the initiator's first byte names, if its credentials allow it: device mode needs
    ``credentials.psk``), ``suite`` its cipher (None: `preferred_suite`); a responder
    takes the initiator's suite if it is in ``accept_suites`` (None: `default_suites`) and
    refuses it with `SuiteRefused` otherwise. ``expected_identity`` /
    ``expected_device_id`` pin the peer when dialing a known device; a mismatch is an
    `IdentityError` raised from `receive_frame` before any application message is accepted.
    ``registry`` lists the application message types this connection accepts (and may send).
    """

    def __init__(
        self,
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
        rekey_interval: int = REKEY_INTERVAL,
        prologue: bytes = PROLOGUE,
    ) -> None:
        if CLOSE.name not in registry:
            raise ValueError("the registry must include the base 'close' message")
        if initiator and mode is Mode.DEVICE and credentials.psk is None:
            raise ValueError("device mode needs credentials with a PSK")
        self._credentials = credentials
        self.initiator = initiator
        self._expected_identity = expected_identity
        self._expected_device_id = expected_device_id
        self._registry = registry
        self._max_message_size = max_message_size
        self._rekey_interval = rekey_interval
        self._prologue = prologue
        self._accept_suites = accept_suites
        #: The handshake mode and cipher suite: chosen by an initiator, read from message 1
        #: by a responder.
        self.mode: Mode | None = None
        self.suite: Suite | None = None
        self._handshake: HandshakeState | None = None
        if initiator:
            self._start_handshake(mode, preferred_suite() if suite is None else suite)
        self._reassembler = Reassembler(max_message_size)
        self._send: _Direction | None = None
        self._receive: _Direction | None = None
        self._outbox: list[bytes] = []
        self.state = ChannelState.HANDSHAKING
        self.peer: PeerIdentity | None = None
        self.handshake_hash: bytes | None = None

    def _start_handshake(self, mode: Mode, suite: Suite) -> HandshakeState:
        own = self._credentials if mode is Mode.DEVICE else self._credentials.for_storage
        self.mode, self.suite = mode, suite
        self._handshake = HandshakeState(
            _PROTOCOLS[mode, suite],
            initiator=self.initiator,
            prologue=self._prologue + bytes([mode | suite]),
            s=own.static_key,
            psk=self._credentials.psk if mode is Mode.DEVICE else None,
        )
        return self._handshake

    @property
    def _own_certificate(self) -> bytes:
        if self.mode is Mode.DEVICE:
            return self._credentials.certificate.to_payload()
        return self._credentials.for_storage.certificate.to_payload()

    # -- limits -----------------------------------------------------------

    @property
    def pending_bytes(self) -> int:
        """Bytes of an unfinished incoming message held by this channel."""
        return self._reassembler.pending_bytes

    def restrict_reassembly(self, max_message_size: int, budget: ReassemblyBudget | None) -> None:
        """Lower the incoming message cap and share ``budget`` with other channels.

        Called once the peer is known (a stranger gets less than our own devices), before any
        of its application frames is processed.
        """
        self._reassembler.restrict(max_message_size, budget)

    def discard_partial(self) -> None:
        """Forget an unfinished incoming message (the connection is ending)."""
        self._reassembler.discard()

    # -- outgoing ---------------------------------------------------------

    def initiate(self) -> bytes:
        """The initiator's first frame (``-> mode, e``)."""
        self._expect(ChannelState.HANDSHAKING)
        hs = self._handshake
        if not self.initiator or hs is None or not hs.is_my_turn() or hs.re is not None:
            self._fail(HandshakeError("only the initiator starts, and only once"))
        assert hs is not None and self.mode is not None and self.suite is not None
        first_byte = bytes([self.mode | self.suite])
        return self._guard(lambda: first_byte + hs.write_message(b""))

    def frames_to_send(self) -> list[bytes]:
        """Frames produced while handling received frames (handshake replies)."""
        frames, self._outbox = self._outbox, []
        return frames

    def send(self, message: Message) -> list[bytes]:
        """Encode, chunk and encrypt one application message."""
        self._expect(ChannelState.OPEN)
        # Header 1 when the message certainly needs several chunks (its bytes and text alone
        # fill one), so the first chunk is never copied behind a corrected header.
        header = 1 if _lower_bound(message) > MAX_CHUNK_PAYLOAD else 0
        # Our own bug if this fails: not a channel failure.
        encoded = self._registry.encode_behind(header, message)
        if len(encoded) - CHUNK_HEADER_BYTES > self._max_message_size:
            size = len(encoded) - CHUNK_HEADER_BYTES
            raise FrameError(f"message of {size} bytes exceeds the send cap")
        try:  # `_guard` without its lambda: this is the per-message path
            return self._encrypt_chunks(encoded)
        except WireError:
            self.state = ChannelState.ERROR
            raise

    def close(self, code: int, reason: str) -> list[bytes]:
        """Frames telling the peer why we close; afterwards the channel is CLOSED."""
        if self.state is not ChannelState.OPEN:
            if self.state is not ChannelState.ERROR:
                self.state = ChannelState.CLOSED
            return []
        reason = _truncate_utf8(reason, MAX_CLOSE_REASON_BYTES)
        frames = self.send(CLOSE(code=code, reason=reason))
        self.state = ChannelState.CLOSED
        return frames

    def _encrypt_chunks(self, encoded: memoryview) -> list[bytes]:
        assert self._send is not None
        return [self._send.encrypt(chunk) for chunk in chunk_encoded(encoded)]

    # -- incoming ---------------------------------------------------------

    def receive_frame(self, frame: bytes | memoryview) -> list[Event]:
        """Process one received frame. Raises `WireError` (and enters ERROR) on any fault."""
        if self.state is ChannelState.HANDSHAKING:
            # Handshake frames are few and small; their code wants bytes.
            handshake_frame = bytes(frame)
            return self._guard(lambda: self._receive_handshake(handshake_frame))
        self._expect(ChannelState.OPEN)
        try:  # `_guard` without its lambda: this is the per-frame path
            return self._receive_transport(frame)
        except WireError:
            self.state = ChannelState.ERROR
            raise

    def _receive_handshake(self, frame: bytes) -> list[Event]:
        hs = self._handshake
        if hs is None:
            # Responder, message 1: the mode byte, then the initiator's ephemeral key.
            if not frame:
                raise HandshakeError(
                    "first handshake message must be a mode byte and one ephemeral key"
                )
            mode, suite = self._offered_mode(frame[0])
            if len(frame) != _FIRST_MESSAGE_SIZE[mode]:
                raise HandshakeError(
                    "first handshake message must be a mode byte and one ephemeral key"
                )
            hs = self._start_handshake(mode, suite)
            hs.read_message(frame[1:])
            # Device mode: message 2 is readable by whoever sent message 1, so it carries
            # nothing; our certificate follows once message 3 proved the PSK.
            payload = b"" if self.mode is Mode.DEVICE else self._own_certificate
            self._outbox.append(hs.write_message(payload))
            return []
        if hs.complete:
            # Device-mode initiator: the responder's certificate, first transport message.
            assert self._receive is not None
            if len(frame) > _MAX_CERTIFICATE_FRAME:
                raise HandshakeError("certificate message too large")
            return [self._open(self._verified(self._receive.decrypt(frame)))]
        if hs.is_my_turn():
            raise HandshakeError("unexpected frame: it is our turn in the handshake")
        if len(frame) > _MAX_HANDSHAKE_FRAME:
            raise HandshakeError("handshake message too large")
        try:
            payload = hs.read_message(frame)
        except DecryptError:
            if self.mode is Mode.DEVICE and not self.initiator:
                # Message 3 did not decrypt: the initiator lacks our PSK. The text reaches the
                # initiator as the close reason (and its peering, which stops dialing it), with
                # `CloseCode.DEVICE_REFUSED`: only this answer sends it on to storage mode.
                raise DeviceRefused(
                    "device handshake failed: the peer is a different identity "
                    "(or the message was damaged)"
                ) from None
            raise
        if self.mode is Mode.DEVICE and self.initiator:
            # Message 2 (empty): answer with message 3 carrying our certificate under keys
            # that include the PSK, then wait for the responder's certificate.
            if payload:
                raise HandshakeError("device-mode message 2 must carry no payload")
            self._outbox.append(hs.write_message(self._own_certificate))
            self._split()
            return []
        if self.mode is Mode.DEVICE:
            # Responder, message 3 decrypted: the initiator holds the PSK.
            peer = self._verified(payload)
            self._split()
            assert self._send is not None
            self._outbox.append(self._send.encrypt(self._own_certificate))
            return [self._open(peer)]
        peer = verify_peer(
            payload,
            hs.remote_static,
            expected_identity=self._expected_identity,
            expected_device_id=self._expected_device_id,
        )
        if self.initiator:
            self._outbox.append(hs.write_message(self._own_certificate))
        self._split()
        return [self._open(peer)]

    def _offered_mode(self, byte: int) -> tuple[Mode, Suite]:
        try:
            mode, suite = Mode(byte & _MODE_BITS), Suite(byte & _SUITE_BITS)
        except ValueError:
            raise HandshakeError(f"unknown handshake mode 0x{byte:02x}") from None
        accepted = self._accept_suites
        if suite not in (frozenset(default_suites()) if accepted is None else accepted):
            raise SuiteRefused(
                f"this node does not take the {suite.cipher_name} cipher suite; "
                f"dial again with ChaChaPoly"
            )
        if mode is Mode.DEVICE and self._credentials.psk is None:
            raise DeviceRefused("this node does not accept device handshakes")
        if mode is Mode.STORAGE and not self._credentials.takes_storage_mode:
            raise HandshakeError("this node does not accept storage handshakes")
        return mode, suite

    def _verified(self, payload: bytes) -> PeerIdentity:
        """A device-mode certificate: it must be our own identity (and what we dialed)."""
        assert self._handshake is not None
        peer = verify_peer(
            payload,
            self._handshake.remote_static,
            expected_identity=self._expected_identity,
            expected_device_id=self._expected_device_id,
        )
        if peer.identity_public_key != self._credentials.certificate.identity_public_key:
            raise IdentityError("device handshake from a different identity")
        return peer

    def _split(self) -> None:
        hs = self._handshake
        assert hs is not None and hs.complete
        self._send = _Direction(hs.send_cipher, self._rekey_interval)
        self._receive = _Direction(hs.receive_cipher, self._rekey_interval)

    def _open(self, peer: PeerIdentity) -> HandshakeComplete:
        hs = self._handshake
        assert hs is not None
        self.peer = peer
        self.handshake_hash = hs.handshake_hash
        self.state = ChannelState.OPEN
        return HandshakeComplete(peer, hs.handshake_hash)

    def _receive_transport(self, frame: bytes | memoryview) -> list[Event]:
        assert self._receive is not None
        if len(frame) > MAX_FRAME_SIZE:
            raise FrameError(f"frame of {len(frame)} bytes exceeds {MAX_FRAME_SIZE}")
        plaintext = self._receive.decrypt(frame)
        encoded = self._reassembler.feed(plaintext)
        if encoded is None:
            return []
        message = self._registry.decode(encoded)
        if message.type == CLOSE.name:
            self.state = ChannelState.CLOSED
            return [CloseReceived(message.get_int("code"), message.get_str("reason"))]
        return [MessageReceived(message)]

    # -- state discipline -------------------------------------------------

    def _expect(self, state: ChannelState) -> None:
        if self.state is not state:
            reason = f"channel is {self.state.value}, not {state.value}"
            if self.state is ChannelState.ERROR:
                raise WireError(reason)
            self._fail(WireError(reason))

    def _fail(self, error: WireError) -> None:
        self.state = ChannelState.ERROR
        raise error

    def _guard(self, step: Callable[[], _T]) -> _T:
        try:
            return step()
        except WireError:
            self.state = ChannelState.ERROR
            raise


def _lower_bound(message: Message) -> int:
    """Bytes the encoding of ``message`` takes at least: its bytes and text fields' lengths."""
    return sum(len(value) for value in message.fields.values() if isinstance(value, bytes | str))


def _truncate_utf8(text: str, limit: int) -> str:
    return text.encode("utf-8", "replace")[:limit].decode("utf-8", "ignore")
