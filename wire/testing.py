"""Helpers for tests, simulations and demos (like ``trio.testing``).

These generate throwaway identities *in process*, which a real node never does:
in production the identity key lives in the vault and `wire` only ever sees a
`DeviceCertificate`. Nothing in `wire` proper imports this module.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

import nacl.signing

from wire._framing import MAX_CHUNK_PAYLOAD
from wire._handshake import DEVICE_ID_BYTES, DeviceCertificate, DeviceCredentials
from wire._messages import BASE_REGISTRY, SchemaRegistry
from wire._noise import KeyPair
from wire._secure_channel import (
    REKEY_INTERVAL,
    ChannelState,
    HandshakeComplete,
    Mode,
    SecureChannel,
    Suite,
)

if TYPE_CHECKING:
    from wire._network import MessageStream

__all__ = [
    "TestIdentity",
    "free_port",
    "new_device",
    "new_storage_credentials",
    "open_channel_pair",
    "open_raw_channel",
    "unfinished_message_frames",
]


def free_port() -> int:
    """A port on 127.0.0.1 free now for both TCP (WebSocket, REST) and UDP (a node's DHT
    takes the same number). Another process may take it before the caller binds it: fine for
    tests and benchmarks, which retry or fail loudly, never for a node."""
    for _ in range(50):
        with socket.socket() as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no port is free for both TCP and UDP on 127.0.0.1")


@dataclass(frozen=True, slots=True)
class TestIdentity:
    """An identity whose signing key is held in memory (tests and sims only)."""

    __test__ = False  # not a pytest test class

    signing_key: nacl.signing.SigningKey

    @classmethod
    def generate(cls) -> TestIdentity:
        return cls(nacl.signing.SigningKey.generate())

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    def sign(self, message: bytes) -> bytes:
        return self.signing_key.sign(message).signature

    @property
    def psk(self) -> bytes:
        """The device-handshake PSK of this identity (a node derives it in the vault)."""
        return hashlib.blake2b(bytes(self.signing_key), person=b"dmgn-test-psk").digest()[:32]

    def new_device(
        self, device_id: bytes | None = None, *, storage: DeviceCredentials | None = None
    ) -> DeviceCredentials:
        """A device of this identity: device-mode PSK included; storage mode presents
        ``storage`` (e.g. `new_storage_credentials`) or, without it, this certificate
        (``storage_is_device``: tests only; a node always has storage credentials)."""
        static_key = KeyPair.generate()
        certificate = DeviceCertificate.issue(
            self.sign,
            self.public_key,
            device_id if device_id is not None else os.urandom(DEVICE_ID_BYTES),
            static_key.public,
        )
        return DeviceCredentials(
            static_key,
            certificate,
            psk=self.psk,
            storage=storage,
            storage_is_device=storage is None,
        )


def new_storage_credentials() -> DeviceCredentials:
    """Storage-mode credentials: a fresh storage key certifying a fresh Noise static key."""
    storage_key = TestIdentity.generate()
    static_key = KeyPair.generate()
    certificate = DeviceCertificate.issue(
        storage_key.sign, storage_key.public_key, os.urandom(DEVICE_ID_BYTES), static_key.public
    )
    return DeviceCredentials(static_key, certificate)


def new_device(identity: TestIdentity | None = None) -> DeviceCredentials:
    """Credentials for a fresh device of ``identity`` (or of a fresh identity)."""
    return (identity or TestIdentity.generate()).new_device()


def open_channel_pair(
    initiator: DeviceCredentials,
    responder: DeviceCredentials,
    *,
    registry: SchemaRegistry = BASE_REGISTRY,
    rekey_interval: int = REKEY_INTERVAL,
    mode: Mode = Mode.STORAGE,
    suite: Suite | None = None,
) -> tuple[SecureChannel, SecureChannel]:
    """Run the handshake (``mode``, ``suite``: None is the machine's preferred one) between
    two in-memory channels; return them OPEN. A suite asked for by name is one the responder
    takes, whatever this CPU's own choice (`default_suites` measures it, so on a machine
    without fast AES, or a busy one, the responder would refuse AES-GCM)."""
    a = SecureChannel(
        initiator,
        initiator=True,
        mode=mode,
        suite=suite,
        registry=registry,
        rekey_interval=rekey_interval,
    )
    b = SecureChannel(
        responder,
        initiator=False,
        registry=registry,
        rekey_interval=rekey_interval,
        accept_suites=None if suite is None else frozenset(Suite),
    )
    assert b.receive_frame(a.initiate()) == []
    (message2,) = b.frames_to_send()
    events_a = a.receive_frame(message2)
    (message3,) = a.frames_to_send()
    events_b = b.receive_frame(message3)
    if mode is Mode.DEVICE:
        (certificate,) = b.frames_to_send()
        assert events_a == []
        events_a = a.receive_frame(certificate)
    assert isinstance(events_a[0], HandshakeComplete)
    assert isinstance(events_b[0], HandshakeComplete)
    return a, b


async def open_raw_channel(
    stream: MessageStream,
    credentials: DeviceCredentials,
    *,
    registry: SchemaRegistry = BASE_REGISTRY,
    mode: Mode = Mode.STORAGE,
) -> SecureChannel:
    """Handshake as the initiator over ``stream``; return the OPEN channel itself.

    For tests and attack scenarios that play a misbehaving peer: they send whatever frames
    they like through the channel (see `unfinished_message_frames`).
    """
    channel = SecureChannel(credentials, initiator=True, mode=mode, registry=registry)
    await stream.send_message(channel.initiate())
    while channel.state is ChannelState.HANDSHAKING:
        channel.receive_frame(await stream.receive_message())
        for frame in channel.frames_to_send():
            await stream.send_message(frame)
    return channel


def unfinished_message_frames(channel: SecureChannel, size: int) -> list[bytes]:
    """Frames carrying at least ``size`` bytes of an application message that never ends
    (every chunk has the MORE bit): what a peer sends to make us buffer."""
    assert channel._send is not None, "the channel is not open"
    chunks = -(-size // MAX_CHUNK_PAYLOAD)
    return [channel._send.encrypt(b"\x01" + bytes(MAX_CHUNK_PAYLOAD)) for _ in range(chunks)]
