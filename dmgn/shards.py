"""Shards and mailbox items: what an identity leaves on other people's nodes.

Two kinds of object go to storage peers (nodes of *other* identities), and both must be useless
to them: they may not read them, forge them, or tell which objects belong to one memory.

**Shards** (one memory's envelope, erasure-coded k-of-n with zfec, the code Tahoe-LAFS uses)::

    plain   = u32 len(envelope) || envelope || zero padding        (to k * S - 16 bytes)
    cipher  = ChaCha20-Poly1305(K_m, nonce 0, plain)               K_m = HMAC(root, "enc" || id)
    blocks  = zfec.encode(cipher split in k blocks of S bytes)     n blocks of S bytes
    shard i = block i || HMAC(root, "tag" || shard_id(i) || block i)[:16]
    shard_id(id, i) = HMAC(root, "id" || id || i)                  32 bytes

``root`` is derived by the vault (``DeriveKey("shards")``) and never leaves our devices. The
shard size S is a power of two (at least :data:`MIN_SHARD_BYTES`), so a storage peer sees one of
a few bucket sizes, ids that look random, and ciphertext (zfec is systematic: without the
encryption, block 0 would carry the envelope's clear header - author, device, time, type). The
encryption is deterministic (a key per memory, used once per plaintext), so re-encoding a memory
gives the same shards: audits and repair recompute them from the local envelope instead of
keeping copies. Each shard carries its own tag, so a corrupt shard is pinned on the peer that
served it, before decoding.

**Mailbox items** (one feed entry of one of our devices, for devices that are never online
together, and for restore)::

    stream  = HMAC(mail, "stream" || device_id)[:16]               mail = DeriveKey("mailbox")
    item    = XChaCha20-Poly1305(mail, random nonce, pad(thin entry), aad = stream || seq)

A *thin* entry is the feed entry with an added envelope replaced by the memory's id (the
envelope travels as shards); :meth:`MailEntry.complete` puts it back, after which the feed's own
signature and hash chain check the result. Items are padded to power-of-two sizes.

Deletes of stored objects are signed by the owner identity (:func:`delete_payload`).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

import msgpack
import nacl.bindings as sodium
import nacl.exceptions
import zfec

from dmgn.crypto import DecryptionFailed, seal, unseal
from dmgn.errors import DmgnError
from dmgn.feed import (
    AddMemory,
    FeedEntry,
    FeedError,
    UnsignedEntry,
    decode_entry,
)
from dmgn.memory import MAX_ENVELOPE_BYTES, memory_id

__all__ = [
    "DEFAULT_K",
    "DEFAULT_N",
    "DELETE_CONTEXT",
    "MAX_MAIL_ITEM_BYTES",
    "MAX_SHARD_BYTES",
    "MIN_SHARD_BYTES",
    "SHARD_ID_BYTES",
    "STREAM_ID_BYTES",
    "MailEntry",
    "MailKeys",
    "ShardError",
    "ShardKeys",
    "ShardParams",
    "decode_shards",
    "delete_payload",
    "encode_shards",
    "shard_size",
]

DEFAULT_K, DEFAULT_N = 3, 6
#: Smallest shard: below this the fixed costs (ids, tags, rows) dominate, and fewer buckets mean
#: less a storage peer learns from sizes. A short text memory (~600 B envelope) fits 3 x 256 B.
MIN_SHARD_BYTES = 256
SHARD_ID_BYTES = 32
STREAM_ID_BYTES = 16
TAG_BYTES = 16
_LEN = struct.Struct(">I")
_AEAD_TAG = 16
#: The largest envelope in the smallest k (1) rounded up to a power of two, plus the tag.
MAX_SHARD_BYTES = 1 << (_LEN.size + MAX_ENVELOPE_BYTES + _AEAD_TAG - 1).bit_length()
MAX_SHARD_BYTES += TAG_BYTES
#: Mailbox items (sealed to powers of two): a thin entry (an add without its envelope, a link,
#: a delete) is 256 or 512 bytes. An add is kept whole only when its memory was deleted (its
#: shards are gone), and a whole item must fit one push (`storage_protocol.MAX_BATCH_BYTES`,
#: 768 KiB): the largest power of two that does is 512 KiB. A deleted memory whose whole add
#: would be larger stays thin (the keeper checks). Items of a whole entry's
#: 2 MiB were accepted before, so a ~100-byte pull of 256 seqs could name 512 MiB.
MAX_MAIL_ITEM_BYTES = 512 * 1024
_MAIL_MIN = 256
#: Domain separation for the owner's signature over a delete request.
DELETE_CONTEXT = b"dmgn-storage-delete-v1:"


class ShardError(DmgnError):
    """Shards that cannot be made into the memory they claim to be (too few, corrupt, forged)."""

    code = "bad_shard"


@dataclass(frozen=True, slots=True)
class ShardParams:
    """k-of-n: any ``k`` of the ``n`` shards rebuild the envelope."""

    k: int = DEFAULT_K
    n: int = DEFAULT_N

    def __post_init__(self) -> None:
        if not (1 <= self.k < self.n <= 256):
            raise ValueError(f"shards {self.k}-of-{self.n}: need 1 <= k < n <= 256")

    @property
    def repair_below(self) -> int:
        """Repair when fewer than ``k + 2`` shards are live: one more loss still leaves k + 1."""
        return min(self.n, self.k + 2)


def _hmac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


def _memory_bytes(mid: str) -> bytes:
    try:
        raw = bytes.fromhex(mid)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ShardError(f"{mid[:16]!r} is not a memory id")
    return raw


@dataclass(frozen=True, slots=True)
class ShardKeys:
    """The owner's shard key (``vault.DeriveKey("shards")``); ``repr`` hides it."""

    root: bytes

    def __repr__(self) -> str:
        return "ShardKeys(<hidden>)"

    def shard_id(self, mid: str, index: int) -> bytes:
        return _hmac(self.root, b"id", _memory_bytes(mid), bytes([index]))

    def _memory_key(self, mid: str) -> bytes:
        return _hmac(self.root, b"enc", _memory_bytes(mid))

    def _tag(self, shard_id: bytes, block: bytes) -> bytes:
        return _hmac(self.root, b"tag", shard_id, block)[:TAG_BYTES]

    def check(self, mid: str, index: int, shard: bytes) -> bool:
        """Whether ``shard`` is shard ``index`` of ``mid`` as we made it (its tag verifies)."""
        if len(shard) <= TAG_BYTES:
            return False
        block, tag = shard[:-TAG_BYTES], shard[-TAG_BYTES:]
        return hmac.compare_digest(tag, self._tag(self.shard_id(mid, index), block))


def shard_size(envelope_bytes: int, k: int) -> int:
    """Bytes of each shard (block + tag) for an envelope of ``envelope_bytes``: the bucket."""
    needed = -(-(_LEN.size + envelope_bytes + _AEAD_TAG) // k)
    return max(MIN_SHARD_BYTES, 1 << (needed - 1).bit_length()) + TAG_BYTES


def encode_shards(envelope: bytes, keys: ShardKeys, params: ShardParams) -> list[bytes]:
    """The ``n`` shards of ``envelope`` (deterministic: the same bytes every time)."""
    mid = memory_id(envelope)
    block = shard_size(len(envelope), params.k) - TAG_BYTES
    plain = _LEN.pack(len(envelope)) + envelope
    plain += bytes(block * params.k - _AEAD_TAG - len(plain))
    cipher = sodium.crypto_aead_chacha20poly1305_ietf_encrypt(
        plain, None, bytes(12), keys._memory_key(mid)
    )
    primary = [cipher[i * block : (i + 1) * block] for i in range(params.k)]
    blocks = zfec.Encoder(params.k, params.n).encode(primary)
    return [bytes(b) + keys._tag(keys.shard_id(mid, i), bytes(b)) for i, b in enumerate(blocks)]


def decode_shards(
    mid: str, shards: dict[int, bytes], keys: ShardKeys, params: ShardParams
) -> bytes:
    """Rebuild the envelope of ``mid`` from any ``k`` shards ``{index: shard}``.

    Shards whose tag fails are ignored (call :meth:`ShardKeys.check` first to blame a peer);
    raises :class:`ShardError` if fewer than ``k`` good ones remain or the result is not ``mid``.
    """
    good = {
        i: s
        for i, s in shards.items()
        if 0 <= i < params.n and keys.check(mid, i, s) and len(s) > TAG_BYTES
    }
    sizes = {len(s) for s in good.values()}
    if len(good) < params.k or len(sizes) != 1:
        raise ShardError(
            f"memory {mid[:12]}: {len(good)} good shards of the {params.k} needed to rebuild it"
        )
    chosen = sorted(good)[: params.k]
    blocks = [good[i][:-TAG_BYTES] for i in chosen]
    primary = zfec.Decoder(params.k, params.n).decode(blocks, chosen)
    cipher = b"".join(bytes(b) for b in primary)
    try:
        plain = sodium.crypto_aead_chacha20poly1305_ietf_decrypt(
            cipher, None, bytes(12), keys._memory_key(mid)
        )
    except nacl.exceptions.CryptoError:
        raise ShardError(f"memory {mid[:12]}: rebuilt shards do not decrypt") from None
    (length,) = _LEN.unpack_from(plain)
    envelope = plain[_LEN.size : _LEN.size + length]
    if length > MAX_ENVELOPE_BYTES or memory_id(envelope) != mid:
        raise ShardError(f"memory {mid[:12]}: rebuilt envelope does not match its id")
    return envelope


def delete_payload(owner: bytes, at: int, object_ids: list[bytes]) -> bytes:
    """What the owner signs (after :data:`DELETE_CONTEXT`) to delete ``object_ids``."""
    packed: bytes = msgpack.packb([owner, at, object_ids], use_bin_type=True)
    return packed


# -- the mailbox --------------------------------------------------------------------------------

_FULL, _THIN = 0, 1


@dataclass(frozen=True, slots=True)
class MailEntry:
    """A feed entry as the mailbox keeps it: whole, or thin (an add, without its envelope)."""

    device_id: bytes
    seq: int
    full: bytes | None  # the entry's bytes, for ops other than adds
    thin: tuple[bytes, int, str, bytes] | None = None  # prev_hash, at, memory id, signature

    @property
    def memory_id(self) -> str | None:
        """The memory whose envelope :meth:`complete` needs (None: the entry is whole)."""
        return None if self.thin is None else self.thin[2]

    @classmethod
    def of(cls, entry: FeedEntry) -> MailEntry:
        if isinstance(entry.op, AddMemory):
            thin = (entry.prev_hash, entry.at, entry.op.memory_id, entry.signature)
            return cls(entry.device_id, entry.seq, None, thin)
        return cls(entry.device_id, entry.seq, entry.encoded)

    def complete(self, envelope: bytes | None = None) -> FeedEntry:
        """The feed entry (structure only: the caller verifies signature and continuity)."""
        if self.full is not None:
            return decode_entry(self.full)
        assert self.thin is not None
        prev_hash, at, mid, signature = self.thin
        if envelope is None or memory_id(envelope) != mid:
            raise FeedError(f"entry {self.device_id.hex()[:8]}/{self.seq} needs memory {mid}")
        unsigned = UnsignedEntry(self.device_id, self.seq, prev_hash, at, AddMemory(envelope))
        return unsigned.signed(signature)

    def encode(self) -> bytes:
        if self.full is not None:
            body: list[object] = [_FULL, self.full]
        else:
            assert self.thin is not None
            body = [_THIN, self.device_id, self.seq, *self.thin]
        packed: bytes = msgpack.packb(body, use_bin_type=True)
        return packed

    @classmethod
    def decode(cls, data: bytes) -> MailEntry:
        try:
            raw = msgpack.unpackb(data, raw=False, max_array_len=8, max_map_len=0)
        except Exception:  # msgpack reports malformed input with many exception types
            raise FeedError("mailbox item is not valid msgpack") from None
        if isinstance(raw, list) and len(raw) == 2 and raw[0] == _FULL:
            entry = decode_entry(raw[1])
            return cls(entry.device_id, entry.seq, raw[1])
        if isinstance(raw, list) and len(raw) == 7 and raw[0] == _THIN:
            _, device, seq, prev_hash, at, mid, signature = raw
            if not (
                isinstance(device, bytes)
                and type(seq) is int
                and isinstance(prev_hash, bytes)
                and type(at) is int
                and isinstance(mid, str)
                and isinstance(signature, bytes)
            ):
                raise FeedError("mailbox item fields have the wrong types")
            return cls(device, seq, None, (prev_hash, at, mid, signature))
        raise FeedError("mailbox item is neither a whole nor a thin entry")


@dataclass(frozen=True, slots=True)
class MailKeys:
    """The owner's mailbox key (``vault.DeriveKey("mailbox")``); ``repr`` hides it."""

    key: bytes

    def __repr__(self) -> str:
        return "MailKeys(<hidden>)"

    def stream_id(self, device_id: bytes) -> bytes:
        return _hmac(self.key, b"stream", device_id)[:STREAM_ID_BYTES]

    def mailbox_target(self, identity: bytes) -> bytes:
        """Where (XOR distance) the identity's mailbox lives; blinded, so the DHT cannot tell."""
        return _hmac(self.key, b"mailbox", identity)

    def seal(self, entry: MailEntry) -> bytes:
        body = entry.encode()
        size = max(_MAIL_MIN, 1 << (len(body) + _LEN.size + 40 - 1).bit_length()) - 40
        plain = _LEN.pack(len(body)) + body
        plain += bytes(size - len(plain))
        return seal(self.key, plain, self._aad(entry.device_id, entry.seq))

    def open(self, stream: bytes, seq: int, item: bytes) -> MailEntry:
        """Decrypt and parse one item of ``stream``; raises FeedError if it is not ours/there."""
        try:
            # The device id is inside; the AAD binds the item to its place in the stream.
            plain = unseal(self.key, item, stream + seq.to_bytes(8, "big"))
        except DecryptionFailed:
            raise FeedError(
                f"mailbox item {stream.hex()[:8]}/{seq} does not decrypt (forged or moved)"
            ) from None
        (length,) = _LEN.unpack_from(plain)
        entry = MailEntry.decode(plain[_LEN.size : _LEN.size + length])
        if entry.seq != seq or self.stream_id(entry.device_id) != stream:
            raise FeedError(f"mailbox item {stream.hex()[:8]}/{seq} is in the wrong place")
        return entry

    def _aad(self, device_id: bytes, seq: int) -> bytes:
        return self.stream_id(device_id) + seq.to_bytes(8, "big")
