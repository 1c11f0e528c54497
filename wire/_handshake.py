"""Binding a Noise static key to a dmgn identity (the libp2p-noise idea, our encoding).

Noise XX authenticates *static keys*; dmgn peers care about *identities*
(ed25519 keys) and their devices. The link is a `DeviceCertificate`: the
identity key signs ``CERTIFICATE_CONTEXT + noise_static_public_key`` once, in
the vault; the device then presents that certificate as its encrypted
handshake payload (storage mode: responder in message 2, initiator in message 3;
device mode: initiator in message 3, responder in the first transport message, see
`wire._secure_channel`). In storage mode the "identity" is a per-node storage key.

The receiver checks, before it accepts any application data:
1. the payload is exactly one well-formed ``identity`` record;
2. the certificate's Noise static key is the one Noise just authenticated
   (otherwise a certificate could be replayed by another device);
3. the ed25519 signature verifies;
4. when dialing a known peer, the identity (and device id, if given) is the
   one we meant to reach.

`wire` never holds the identity private key: certificates are produced with a
signing callback (`DeviceCertificate.issue`) supplied by whoever owns the key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import nacl.exceptions
import nacl.signing

from wire._errors import IdentityError, SchemaError
from wire._messages import Bytes, MessageType, SchemaRegistry
from wire._noise import DHLEN, KeyPair

__all__ = [
    "CERTIFICATE_CONTEXT",
    "DEVICE_ID_BYTES",
    "IDENTITY_KEY_BYTES",
    "PSK_BYTES",
    "SIGNATURE_BYTES",
    "DeviceCertificate",
    "DeviceCredentials",
    "PeerIdentity",
]

# Domain separation: this signature can never be mistaken for a signature over
# a memory envelope, a feed op or a DHT record made with the same identity key.
CERTIFICATE_CONTEXT = b"dmgn-noise-static-key:"
IDENTITY_KEY_BYTES = 32  # ed25519 public key
DEVICE_ID_BYTES = 16  # random per data dir (docs/design.md, "Data model")
SIGNATURE_BYTES = 64  # ed25519 signature

_IDENTITY_PAYLOAD = MessageType(
    "identity",
    {
        "identity": Bytes(IDENTITY_KEY_BYTES, IDENTITY_KEY_BYTES),
        "device": Bytes(DEVICE_ID_BYTES, DEVICE_ID_BYTES),
        "sig": Bytes(SIGNATURE_BYTES, SIGNATURE_BYTES),
    },
)
_HANDSHAKE_REGISTRY = SchemaRegistry([_IDENTITY_PAYLOAD])


def _check_len(name: str, value: bytes, size: int) -> None:
    if not isinstance(value, bytes) or len(value) != size:
        raise IdentityError(f"{name} must be {size} bytes")


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Who is on the other end, established by a verified handshake."""

    identity_public_key: bytes
    device_id: bytes
    noise_static_public_key: bytes

    def __repr__(self) -> str:
        return (
            f"PeerIdentity(identity={self.identity_public_key.hex()[:16]}…, "
            f"device={self.device_id.hex()})"
        )


@dataclass(frozen=True, slots=True)
class DeviceCertificate:
    """An identity's signature binding one device's Noise static key to it."""

    identity_public_key: bytes
    device_id: bytes
    noise_static_public_key: bytes
    signature: bytes

    def __post_init__(self) -> None:
        _check_len("identity public key", self.identity_public_key, IDENTITY_KEY_BYTES)
        _check_len("device id", self.device_id, DEVICE_ID_BYTES)
        _check_len("Noise static public key", self.noise_static_public_key, DHLEN)
        _check_len("signature", self.signature, SIGNATURE_BYTES)

    @staticmethod
    def signing_message(noise_static_public_key: bytes) -> bytes:
        """The exact bytes the identity key signs."""
        return CERTIFICATE_CONTEXT + noise_static_public_key

    @classmethod
    def issue(
        cls,
        sign: Callable[[bytes], bytes],
        identity_public_key: bytes,
        device_id: bytes,
        noise_static_public_key: bytes,
    ) -> DeviceCertificate:
        """Create a certificate; ``sign`` returns a 64-byte ed25519 signature.

        Taking a callback keeps the identity secret with its owner (the vault).
        The certificate is verified before it is returned.
        """
        signature = sign(cls.signing_message(noise_static_public_key))
        certificate = cls(identity_public_key, device_id, noise_static_public_key, signature)
        certificate.verify()
        return certificate

    def verify(self) -> None:
        try:
            nacl.signing.VerifyKey(self.identity_public_key).verify(
                self.signing_message(self.noise_static_public_key), self.signature
            )
        except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
            raise IdentityError("device certificate signature is invalid") from exc

    def to_payload(self) -> bytes:
        return _HANDSHAKE_REGISTRY.encode(
            _IDENTITY_PAYLOAD(
                identity=self.identity_public_key, device=self.device_id, sig=self.signature
            )
        )

    @classmethod
    def from_payload(cls, payload: bytes, noise_static_public_key: bytes) -> DeviceCertificate:
        """Parse a handshake payload; the static key comes from Noise, not from the peer."""
        try:
            record = _HANDSHAKE_REGISTRY.decode(payload)
        except SchemaError as exc:
            raise IdentityError(f"bad identity payload: {exc}") from exc
        return cls(
            record.get_bytes("identity"),
            record.get_bytes("device"),
            noise_static_public_key,
            record.get_bytes("sig"),
        )

    @property
    def peer(self) -> PeerIdentity:
        return PeerIdentity(self.identity_public_key, self.device_id, self.noise_static_public_key)


#: A Noise pre-shared key is exactly 32 bytes (Noise spec 9.2).
PSK_BYTES = 32


@dataclass(frozen=True, slots=True)
class DeviceCredentials:
    """What a device hands to `wire`: its Noise static key pair and its certificate.

    ``psk`` (32 bytes, derived from the identity seed by whoever owns it) enables the device
    handshake (`wire.Mode.DEVICE`, Noise XXpsk3): only holders of the same PSK complete it.
    ``storage`` are the credentials presented in storage mode (`wire.Mode.STORAGE`, plain
    XX, towards strangers): a certificate for a per-node storage key, so a stranger never
    sees the identity. Credentials with a PSK and no storage credentials refuse storage mode
    (`for_storage` raises): showing a stranger the identity certificate is never a silent
    fallback. Without a PSK (tools), or with ``storage_is_device`` (tests only, said
    explicitly), storage mode presents these device credentials.
    """

    static_key: KeyPair
    certificate: DeviceCertificate
    psk: bytes | None = None
    storage: DeviceCredentials | None = None
    storage_is_device: bool = False

    def __post_init__(self) -> None:
        if self.certificate.noise_static_public_key != self.static_key.public:
            raise IdentityError("certificate is for a different Noise static key")
        self.certificate.verify()
        if self.psk is not None:
            _check_len("device PSK", self.psk, PSK_BYTES)
        if self.storage is not None and (self.storage.psk or self.storage.storage):
            raise IdentityError("storage credentials carry no PSK and no nested credentials")
        if self.storage is not None and self.storage_is_device:
            raise IdentityError("give storage credentials or storage_is_device, not both")

    def __repr__(self) -> str:  # never print the PSK
        return f"DeviceCredentials({self.certificate.peer!r}, psk={self.psk is not None})"

    @property
    def takes_storage_mode(self) -> bool:
        """Whether storage mode has credentials to present (see the class docstring)."""
        return self.storage is not None or self.psk is None or self.storage_is_device

    @property
    def for_storage(self) -> DeviceCredentials:
        """What storage mode presents; `IdentityError` if that would be the identity of
        credentials that have a PSK (a node that forgot its storage credentials)."""
        if self.storage is not None:
            return self.storage
        if not self.takes_storage_mode:
            raise IdentityError(
                "no storage credentials: storage mode would show strangers this identity "
                "(pass storage= to DeviceCredentials)"
            )
        return self


def verify_peer(
    payload: bytes,
    remote_static: bytes | None,
    *,
    expected_identity: bytes | None,
    expected_device_id: bytes | None,
) -> PeerIdentity:
    """Checks 1-4 of the module docstring; raises `IdentityError` on any failure."""
    if remote_static is None:
        raise IdentityError("peer did not send a Noise static key")
    certificate = DeviceCertificate.from_payload(payload, remote_static)
    certificate.verify()
    if expected_identity is not None and certificate.identity_public_key != expected_identity:
        raise IdentityError(
            # Neither identity: this text reaches our log and `dmgn peers`, and the close
            # reason the other side logs; a dial to a stranger found on the LAN must put
            # neither its identity nor ours there (issue 20).
            "peer is a different identity than the one dialed"
        )
    if expected_device_id is not None and certificate.device_id != expected_device_id:
        raise IdentityError(
            f"peer is a different device than the one dialed "
            f"(expected {expected_device_id.hex()}, got {certificate.device_id.hex()})"
        )
    return certificate.peer
