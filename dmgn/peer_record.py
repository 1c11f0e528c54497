"""Signed, expiring records published in the DHT: where a device is, and which devices an
identity has.

The Kademlia DHT is untrusted storage: any node can overwrite any key, and a read returns the
value most of the answering nodes hold. So every record is signed by an identity key and carries
an expiry, and is verified on read; a record that fails (bad signature, expired, malformed,
oversized) is treated as absent.

    peer record      key  b"dmgn-peer:" + device_id
                     body [version, "peer", identity, device_id, noise_static_key, addrs,
                           issued_at, expires_at]           (seconds since the epoch)
    provider record  key  b"dmgn-provider:" + sha256(identity)
                     body [version, "provider", identity, [peer record bytes...],
                           issued_at, expires_at]
    signature = ed25519(identity, RECORD_CONTEXT || msgpack(body));  bytes = msgpack(body + [sig])

A peer record signed by the identity binds the device's Noise static key to that identity, like
the handshake certificate (so a dialer can tell in advance which key to expect). A provider
record lists the identity's devices (and may list storage peers, whose entries are signed by
their own identities); every device of the identity holds the identity key, so each one merges
its own entry in and re-signs the whole record (read, merge, write). Entries are verified one by
one; an expired entry is dropped, not fatal.

Records are built without keys: ``signing_payload()`` gives the bytes the vault signs with
``Sign(RECORD_CONTEXT, payload)``, and ``signed(signature)`` attaches the result.

What goes into the DHT (issue 12 item 5): only *sealed* provider records. Anyone who knew an
identity's public key could read every device id, address and Noise key of it from
``provider_key(identity)``; and any stranger could store a record there. So the provider record
is blinded with a `ProviderLocator`, derived in the vault from the identity seed, which only the
identity's own devices hold:

    sealed record    key  b"dmgn-provider:" + sha256(locator public key)
                     body [version, "sealed", locator public key,
                           XChaCha20-Poly1305(seal key, provider record bytes, aad = locator),
                           issued_at, expires_at]
                     signature = ed25519(locator key, RECORD_CONTEXT || msgpack(body))

A DHT node can check everything it needs without learning whose record it is: the key is
the hash of the signer's key (so nobody but the locator's holder can store under it, and a
valid record can never be displaced by another signer's), the signature, the validity period
and the size. Holders of the identity open it and verify the inner provider record, signed by
the identity itself. Peer records are no longer published on their own (the sealed provider
record carries them), so a device id seen on the LAN leads nowhere in the DHT.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

import msgpack
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from dmgn.crypto import DecryptionFailed, hkdf_sha256, seal, unseal
from dmgn.errors import DmgnError

__all__ = [
    "LOCATOR_PURPOSE",
    "MAX_ADDRS",
    "MAX_ADDR_CHARS",
    "MAX_CLOCK_SKEW",
    "MAX_PROVIDER_ENTRIES",
    "MAX_RECORD_BYTES",
    "MAX_RECORD_LIFETIME",
    "RECORD_CONTEXT",
    "PeerRecord",
    "ProviderLocator",
    "ProviderRecord",
    "RecordError",
    "SealedRecord",
    "decode_peer_record",
    "decode_provider_record",
    "decode_sealed_record",
    "peer_key",
    "provider_key",
    "sealed_key",
]

RECORD_VERSION = 1
#: Domain separation from feed entries, envelopes and Noise certificates signed by the same key.
RECORD_CONTEXT = b"dmgn-dht-record-v1:"
#: kademlia 2.2 drops any UDP datagram over 8192 bytes, and a STORE or FIND_VALUE reply wraps
#: the value in msgpack with the key, a message id and the sender: 7 KiB leaves ~1 KiB for that.
MAX_RECORD_BYTES = 7 * 1024
#: ws:// URLs a device announces (LAN, public, IPv6...). 8 is plenty; 200 chars covers any
#: hostname and port.
MAX_ADDRS = 8
MAX_ADDR_CHARS = 200
#: A record promising to be valid for longer than this is refused: a stolen or stale record must
#: die out on its own within a day.
MAX_RECORD_LIFETIME = 24 * 3600
#: A record issued this far in the future is refused. NTP keeps clocks within a second; a
#: minute tolerates an unsynced laptop. Kept small because DHT nodes keep the newest record:
#: a future-dated one would shadow honest updates until its time came (issue 12 saw 290 s).
MAX_CLOCK_SKEW = 60
#: The vault's `DeriveKey` purpose of the secret behind an identity's `ProviderLocator`.
LOCATOR_PURPOSE = "dht-provider-locator"
#: Entries in one provider record; the byte cap usually binds first (~10 devices with few addrs).
MAX_PROVIDER_ENTRIES = 32

_KIND_PEER, _KIND_PROVIDER, _KIND_SEALED = "peer", "provider", "sealed"
#: Bytes sealing adds around a provider record (locator key, nonce, tag, times, signature and
#: msgpack framing: ~170), rounded up; merged provider records leave this much room.
_SEAL_OVERHEAD = 256


class RecordError(DmgnError):
    """A DHT record is malformed, forged, expired or too large."""

    code = "bad_record"


def peer_key(device_id: bytes) -> bytes:
    return b"dmgn-peer:" + device_id


def provider_key(identity: bytes) -> bytes:
    """The DHT key under which an identity's devices are listed (its hash, not the key)."""
    return b"dmgn-provider:" + hashlib.sha256(identity).digest()


def _check_addr(addr: object) -> str:
    if not isinstance(addr, str) or not 0 < len(addr) <= MAX_ADDR_CHARS:
        raise RecordError("record: bad address")
    parts = urlsplit(addr)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ("ws", "wss") or not parts.hostname or port is None:
        raise RecordError(f"record: {addr[:60]!r} is not a ws:// address")
    return addr


def _check_times(issued_at: int, expires_at: int, now: int | None) -> None:
    if not (
        type(issued_at) is int
        and type(expires_at) is int
        and 0 < issued_at < expires_at <= issued_at + MAX_RECORD_LIFETIME
    ):
        raise RecordError("record: bad validity period")
    if now is not None:
        if issued_at > now + MAX_CLOCK_SKEW:
            raise RecordError("record: issued in the future")
        if expires_at <= now:
            raise RecordError("record: expired")


def _verify(identity: bytes, payload: bytes, signature: bytes) -> None:
    try:
        VerifyKey(identity).verify(RECORD_CONTEXT + payload, signature)
    except (BadSignatureError, ValueError, TypeError):
        raise RecordError("record: signature does not verify (tampered or forged)") from None


def _unpack(data: bytes, length: int) -> list[Any]:
    if not isinstance(data, bytes) or len(data) > MAX_RECORD_BYTES:
        raise RecordError("record: not bytes, or larger than the DHT allows")
    try:
        raw = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_map_len=0,
            max_array_len=MAX_PROVIDER_ENTRIES + 8,
            ext_hook=_no_extension,
        )
    except RecordError:
        raise
    except Exception:  # msgpack reports malformed input with many exception types
        raise RecordError("record: not valid msgpack") from None
    if not isinstance(raw, list) or len(raw) != length or raw[0] != RECORD_VERSION:
        raise RecordError("record: wrong shape or version")
    return raw


def _no_extension(code: int, data: bytes) -> object:
    raise RecordError("record: msgpack extension types are not allowed")


def _pack(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


@dataclass(frozen=True, slots=True)
class PeerRecord:
    """Where one device listens, and its Noise key, signed by its identity."""

    identity: bytes
    device_id: bytes
    noise_key: bytes
    addrs: tuple[str, ...]
    issued_at: int
    expires_at: int
    signature: bytes = b""

    def __post_init__(self) -> None:
        if not (
            isinstance(self.identity, bytes)
            and len(self.identity) == 32
            and isinstance(self.device_id, bytes)
            and len(self.device_id) == 16
            and isinstance(self.noise_key, bytes)
            and len(self.noise_key) == 32
            and isinstance(self.signature, bytes)
            and len(self.signature) in (0, 64)
        ):
            raise RecordError("peer record: bad key, id or signature length")
        if not isinstance(self.addrs, tuple) or not 1 <= len(self.addrs) <= MAX_ADDRS:
            raise RecordError(f"peer record: needs 1-{MAX_ADDRS} addresses")
        for addr in self.addrs:
            _check_addr(addr)
        _check_times(self.issued_at, self.expires_at, None)

    def _body(self) -> list[Any]:
        return [
            RECORD_VERSION,
            _KIND_PEER,
            self.identity,
            self.device_id,
            self.noise_key,
            list(self.addrs),
            self.issued_at,
            self.expires_at,
        ]

    def signing_payload(self) -> bytes:
        return _pack(self._body())

    def signed(self, signature: bytes) -> PeerRecord:
        record = replace(self, signature=signature)
        if len(record.encode()) > MAX_RECORD_BYTES:
            raise RecordError("peer record is too large for the DHT; announce fewer addresses")
        return record

    def encode(self) -> bytes:
        if not self.signature:
            raise RecordError("peer record is not signed")
        return _pack([*self._body(), self.signature])

    def verify(self, now: int) -> None:
        """Signature by ``identity``, and valid at ``now`` (seconds since the epoch)."""
        _check_times(self.issued_at, self.expires_at, now)
        _verify(self.identity, self.signing_payload(), self.signature)


def decode_peer_record(
    data: bytes, *, now: int, expected_device: bytes | None = None
) -> PeerRecord:
    """Parse and verify a peer record read from the DHT."""
    raw = _unpack(data, 9)
    _, kind, identity, device_id, noise_key, addrs, issued_at, expires_at, signature = raw
    if kind != _KIND_PEER or not isinstance(addrs, list):
        raise RecordError("record: not a peer record")
    record = PeerRecord(
        identity, device_id, noise_key, tuple(addrs), issued_at, expires_at, signature
    )
    if len(signature) != 64:
        raise RecordError("peer record is not signed")
    if record.encode() != data:
        raise RecordError("record: not canonically encoded")
    if expected_device is not None and device_id != expected_device:
        raise RecordError("record: stored under another device's key")
    record.verify(now)
    return record


@dataclass(frozen=True, slots=True)
class ProviderRecord:
    """The devices (and storage peers) of one identity, signed by that identity."""

    identity: bytes
    entries: tuple[PeerRecord, ...]
    issued_at: int
    expires_at: int
    signature: bytes = b""

    def __post_init__(self) -> None:
        if not (isinstance(self.identity, bytes) and len(self.identity) == 32):
            raise RecordError("provider record: bad identity")
        if len(self.entries) > MAX_PROVIDER_ENTRIES:
            raise RecordError(f"provider record: more than {MAX_PROVIDER_ENTRIES} entries")
        _check_times(self.issued_at, self.expires_at, None)

    def _body(self) -> list[Any]:
        return [
            RECORD_VERSION,
            _KIND_PROVIDER,
            self.identity,
            [entry.encode() for entry in self.entries],
            self.issued_at,
            self.expires_at,
        ]

    def signing_payload(self) -> bytes:
        return _pack(self._body())

    def signed(self, signature: bytes) -> ProviderRecord:
        record = replace(self, signature=signature)
        if len(record.encode()) > MAX_RECORD_BYTES:
            raise RecordError("provider record is too large for the DHT")
        return record

    def encode(self) -> bytes:
        if not self.signature:
            raise RecordError("provider record is not signed")
        return _pack([*self._body(), self.signature])

    def verify(self, now: int) -> None:
        _check_times(self.issued_at, self.expires_at, now)
        _verify(self.identity, self.signing_payload(), self.signature)

    @classmethod
    def merged(
        cls,
        identity: bytes,
        current: ProviderRecord | None,
        entry: PeerRecord,
        *,
        now: int,
        ttl: int,
    ) -> ProviderRecord:
        """``current`` with ``entry`` added or replacing the same device's, expired entries
        dropped, and trimmed (oldest first) to fit the DHT's size limit. Unsigned."""
        others = sorted(
            (
                e
                for e in (current.entries if current else ())
                if e.device_id != entry.device_id and e.expires_at > now
            ),
            key=lambda e: e.issued_at,
            reverse=True,
        )
        entries = [entry, *others][:MAX_PROVIDER_ENTRIES]
        while True:
            record = cls(identity, tuple(entries), now, now + ttl)
            # 64 bytes of signature and a few of framing are added when signed.
            size = len(_pack([*record._body(), bytes(64)]))
            if size <= MAX_RECORD_BYTES - _SEAL_OVERHEAD or len(entries) == 1:
                return record
            entries.pop()


def decode_provider_record(
    data: bytes, *, now: int, identity: bytes | None = None
) -> ProviderRecord:
    """Parse and verify a provider record; expired or invalid entries are dropped.

    ``identity``: the identity whose key this was read under (the record must be its own).
    """
    raw = _unpack(data, 7)
    _, kind, record_identity, blobs, issued_at, expires_at, signature = raw
    if (
        kind != _KIND_PROVIDER
        or not isinstance(blobs, list)
        or not all(isinstance(b, bytes) for b in blobs)
    ):
        raise RecordError("record: not a provider record")
    if identity is not None and record_identity != identity:
        raise RecordError("record: signed by another identity than the one looked up")
    if not isinstance(signature, bytes) or len(signature) != 64:
        raise RecordError("provider record is not signed")
    if not isinstance(record_identity, bytes) or len(record_identity) != 32:
        raise RecordError("provider record: bad identity")
    _check_times(issued_at, expires_at, now)
    body = [RECORD_VERSION, _KIND_PROVIDER, record_identity, blobs, issued_at, expires_at]
    if _pack([*body, signature]) != data:
        raise RecordError("record: not canonically encoded")
    _verify(record_identity, _pack(body), signature)
    entries = []
    for blob in blobs:
        try:
            entries.append(decode_peer_record(blob, now=now))
        except RecordError:
            continue  # one stale or bad entry does not void the others
    return ProviderRecord(record_identity, tuple(entries), issued_at, expires_at, signature)


# -- blinded provider records -----------------------------------------------------------------


def sealed_key(locator_public_key: bytes) -> bytes:
    """The DHT key of the sealed record signed by ``locator_public_key``."""
    return b"dmgn-provider:" + hashlib.sha256(b"dmgn-locator:" + locator_public_key).digest()


@dataclass(frozen=True, slots=True)
class SealedRecord:
    """A provider record encrypted and signed with a `ProviderLocator` (see the module doc)."""

    locator: bytes
    ciphertext: bytes
    issued_at: int
    expires_at: int
    signature: bytes = b""

    def _body(self) -> list[Any]:
        return [
            RECORD_VERSION,
            _KIND_SEALED,
            self.locator,
            self.ciphertext,
            self.issued_at,
            self.expires_at,
        ]

    def signing_payload(self) -> bytes:
        return _pack(self._body())

    def encode(self) -> bytes:
        if not self.signature:
            raise RecordError("sealed record is not signed")
        return _pack([*self._body(), self.signature])

    @property
    def key(self) -> bytes:
        return sealed_key(self.locator)


def decode_sealed_record(data: bytes, *, now: int) -> SealedRecord:
    """Parse and verify a sealed record: what any DHT node checks before storing one.

    The DHT key it belongs under is ``record.key``; a store under any other key is refused.
    """
    raw = _unpack(data, 7)
    _, kind, locator, ciphertext, issued_at, expires_at, signature = raw
    if kind != _KIND_SEALED:
        raise RecordError("record: not a sealed provider record")
    if not (isinstance(locator, bytes) and len(locator) == 32):
        raise RecordError("sealed record: bad locator key")
    if not isinstance(ciphertext, bytes) or not isinstance(signature, bytes):
        raise RecordError("sealed record: wrong field types")
    if len(signature) != 64:
        raise RecordError("sealed record is not signed")
    _check_times(issued_at, expires_at, now)
    record = SealedRecord(locator, ciphertext, issued_at, expires_at, signature)
    if record.encode() != data:
        raise RecordError("record: not canonically encoded")
    _verify(locator, record.signing_payload(), signature)
    return record


class ProviderLocator:
    """The keys that let an identity's devices publish and find its provider record blindly.

    Derived from one vault secret (``DeriveKey(LOCATOR_PURPOSE)``): an ed25519 key whose public
    half names the DHT key and signs the sealed record, and a symmetric key that encrypts the
    provider record inside. Neither reveals the identity, and neither can be computed from it.
    """

    __slots__ = ("_seal_key", "_signing_key", "public_key")

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes) or len(secret) != 32:
            raise ValueError("a provider locator needs a 32-byte secret")
        self._signing_key = SigningKey(hkdf_sha256(secret, b"dmgn dht locator signing"))
        self._seal_key = hkdf_sha256(secret, b"dmgn dht locator seal")
        self.public_key = bytes(self._signing_key.verify_key)

    def __repr__(self) -> str:
        return f"ProviderLocator(public={self.public_key.hex()[:16]}…)"

    @property
    def key(self) -> bytes:
        """Where our sealed record lives in the DHT."""
        return sealed_key(self.public_key)

    def seal(self, provider: ProviderRecord) -> SealedRecord:
        """Encrypt and sign a signed provider record; same validity period as the inner one."""
        ciphertext = seal(self._seal_key, provider.encode(), aad=self.public_key)
        unsigned = SealedRecord(
            self.public_key, ciphertext, provider.issued_at, provider.expires_at
        )
        signature = self._signing_key.sign(RECORD_CONTEXT + unsigned.signing_payload()).signature
        record = replace(unsigned, signature=signature)
        if len(record.encode()) > MAX_RECORD_BYTES:
            raise RecordError("sealed provider record is too large for the DHT")
        return record

    def open(self, record: SealedRecord, *, now: int, identity: bytes) -> ProviderRecord:
        """Decrypt and verify: the inner record must be signed by ``identity`` itself."""
        if record.locator != self.public_key:
            raise RecordError("sealed record: signed by another locator")
        try:
            plaintext = unseal(self._seal_key, record.ciphertext, aad=self.public_key)
        except DecryptionFailed:
            raise RecordError("sealed record: does not decrypt with our key") from None
        return decode_provider_record(plaintext, now=now, identity=identity)
