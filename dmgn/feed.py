"""Device feeds: the signed, append-only op logs that devices of one identity sync.

Each device appends the changes it makes (add a memory, link, unlink, delete) to its own feed.
An entry is

    body  = [FEED_VERSION, device_id, seq, prev_hash, at_ns, op]
    sig   = ed25519(identity, FEED_ENTRY_CONTEXT || msgpack(body))
    entry bytes = msgpack([FEED_VERSION, device_id, seq, prev_hash, at_ns, op, sig])
    hash  = sha256(entry bytes)         prev_hash of entry seq+1; 32 zero bytes before seq 1

The signature is made by the *identity* key (every device of one identity holds it, in its vault),
so any device can check any other device's entries with only the identity public key. The entry
is built here without the key (:class:`UnsignedEntry` gives the exact bytes to sign, which the
vault's ``Sign(FEED_ENTRY_CONTEXT, payload)`` signs) and the signature is attached afterwards.

Decoding is strict because entries come from the network: the bytes must be exactly the
canonical msgpack encoding of a well-formed entry (re-encoding must give the same bytes), so an
entry has one hash and a peer cannot make two byte strings of "the same" entry. Every problem is
one error type, :class:`FeedError`, raised before the caller sees any part of the entry.

Version vectors (``{device_id: highest contiguous seq}``) say how much of each feed a device has;
comparing two tells each side exactly which ranges the other lacks.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from dmgn.errors import DmgnError, TamperedEnvelope
from dmgn.memory import MAX_ENVELOPE_BYTES, memory_id, read_header

__all__ = [
    "FEED_ENTRY_CONTEXT",
    "FEED_VERSION",
    "GENESIS_HASH",
    "MAX_EDGE_TYPE_BYTES",
    "MAX_ENTRY_BYTES",
    "MAX_LINK_WEIGHT",
    "MAX_SEQ",
    "MAX_VECTOR_DEVICES",
    "AddMemory",
    "Delete",
    "FeedEntry",
    "FeedError",
    "FeedHead",
    "Link",
    "Op",
    "Unlink",
    "UnsignedEntry",
    "VersionVector",
    "check_continuity",
    "decode_entry",
    "op_memory_ids",
]

FEED_VERSION = 1
#: Domain separation: a feed signature can never be replayed as an envelope, Noise certificate
#: or DHT record signature made with the same identity key.
FEED_ENTRY_CONTEXT = b"dmgn-feed-entry-v1:"
GENESIS_HASH = bytes(32)
DEVICE_ID_BYTES = 16
HASH_BYTES = 32
SIGNATURE_BYTES = 64
MEMORY_ID_CHARS = 64  # sha256 hex, as dmgn.memory.memory_id
#: Same bounds as the API's link request (dmgn.api.LinkMemories), so every local link can be
#: published and nothing a peer sends can exceed what a local user could create.
MAX_EDGE_TYPE_BYTES = 64
MAX_LINK_WEIGHT = 1e6
#: Sequence numbers fit msgpack's uint64 and SQL BIGINT; 2**62 ops is beyond any lifetime.
MAX_SEQ = 2**62
#: One entry carries at most one envelope plus a fixed-size frame (ids, hashes, signature).
MAX_ENTRY_BYTES = MAX_ENVELOPE_BYTES + 1024
#: Devices one identity may have in a vector. A person has a handful; 1024 bounds what a peer
#: can make us allocate with one vector message.
MAX_VECTOR_DEVICES = 1024


class FeedError(DmgnError):
    """A feed entry, op or vector is malformed, forged or does not continue its feed."""

    code = "bad_feed_entry"


# -- ops ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AddMemory:
    """A new memory: its envelope, as sealed and signed by the vault."""

    envelope: bytes

    @property
    def memory_id(self) -> str:
        return memory_id(self.envelope)


@dataclass(frozen=True, slots=True)
class Link:
    from_id: str
    to_id: str
    edge_type: str
    weight: float


@dataclass(frozen=True, slots=True)
class Unlink:
    from_id: str
    to_id: str
    edge_type: str


@dataclass(frozen=True, slots=True)
class Delete:
    """A tombstone: the memory is gone everywhere, and a later add of it is refused."""

    memory_id: str


Op = AddMemory | Link | Unlink | Delete

_TAG_ADD, _TAG_LINK, _TAG_UNLINK, _TAG_DELETE = "add", "link", "unlink", "del"


def op_memory_ids(op: Op) -> tuple[str, ...]:
    """The memory ids an op touches (for tombstone checks)."""
    match op:
        case AddMemory():
            return (op.memory_id,)
        case Link() | Unlink():
            return (op.from_id, op.to_id)
        case Delete():
            return (op.memory_id,)


def _encode_op(op: Op) -> list[Any]:
    match op:
        case AddMemory():
            return [_TAG_ADD, op.envelope]
        case Link():
            return [_TAG_LINK, op.from_id, op.to_id, op.edge_type, float(op.weight)]
        case Unlink():
            return [_TAG_UNLINK, op.from_id, op.to_id, op.edge_type]
        case Delete():
            return [_TAG_DELETE, op.memory_id]


def _is_memory_id(value: object) -> bool:
    return (
        isinstance(value, str)
        and len(value) == MEMORY_ID_CHARS
        and all(c in "0123456789abcdef" for c in value)
    )


def _is_edge_type(value: object) -> bool:
    return isinstance(value, str) and 1 <= len(value.encode("utf-8", "surrogatepass")) <= (
        MAX_EDGE_TYPE_BYTES
    )


def _decode_op(raw: object) -> Op:
    if not isinstance(raw, list) or not raw:
        raise FeedError("op is not a tagged list")
    tag, args = raw[0], raw[1:]
    if tag == _TAG_ADD and len(args) == 1 and isinstance(args[0], bytes):
        if not 0 < len(args[0]) <= MAX_ENVELOPE_BYTES:
            raise FeedError("add op: envelope size out of bounds")
        return AddMemory(args[0])
    if tag == _TAG_LINK and len(args) == 4:
        from_id, to_id, edge_type, weight = args
        if not (
            _is_memory_id(from_id)
            and _is_memory_id(to_id)
            and _is_edge_type(edge_type)
            and isinstance(weight, float)
            and math.isfinite(weight)
            and 0.0 <= weight <= MAX_LINK_WEIGHT
            and from_id != to_id
        ):
            raise FeedError("link op: bad ids, edge type or weight")
        return Link(from_id, to_id, edge_type, weight)
    if tag == _TAG_UNLINK and len(args) == 3:
        from_id, to_id, edge_type = args
        if not (_is_memory_id(from_id) and _is_memory_id(to_id) and _is_edge_type(edge_type)):
            raise FeedError("unlink op: bad ids or edge type")
        return Unlink(from_id, to_id, edge_type)
    if tag == _TAG_DELETE and len(args) == 1 and _is_memory_id(args[0]):
        return Delete(args[0])
    raise FeedError(f"unknown or malformed op {str(tag)[:16]!r}")


def validate_op(op: Op) -> None:
    """Check a locally made op against the same rules a receiver applies."""
    _decode_op(_encode_op(op))


# -- entries ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UnsignedEntry:
    """An entry before signing. ``signing_payload`` is what the vault signs (after the context)."""

    device_id: bytes
    seq: int
    prev_hash: bytes
    at: int  # wall-clock ns on the authoring device; orders concurrent link/unlink
    op: Op

    def __post_init__(self) -> None:
        if len(self.device_id) != DEVICE_ID_BYTES:
            raise FeedError(f"device id must be {DEVICE_ID_BYTES} bytes")
        if not 1 <= self.seq <= MAX_SEQ:
            raise FeedError(f"seq {self.seq} out of range")
        if len(self.prev_hash) != HASH_BYTES:
            raise FeedError("prev_hash must be 32 bytes")
        if not 0 <= self.at < 2**63:
            raise FeedError("timestamp out of range")
        validate_op(self.op)

    def _body(self) -> list[Any]:
        return [
            FEED_VERSION,
            self.device_id,
            self.seq,
            self.prev_hash,
            self.at,
            _encode_op(self.op),
        ]

    def signing_payload(self) -> bytes:
        """The bytes signed after :data:`FEED_ENTRY_CONTEXT` (``vault.Sign(context, this)``)."""
        return _pack(self._body())

    def signed(self, signature: bytes) -> FeedEntry:
        if len(signature) != SIGNATURE_BYTES:
            raise FeedError("signature must be 64 bytes")
        encoded = _pack([*self._body(), signature])
        if len(encoded) > MAX_ENTRY_BYTES:
            raise FeedError(f"entry is {len(encoded)} bytes; the limit is {MAX_ENTRY_BYTES}")
        return FeedEntry(
            self.device_id, self.seq, self.prev_hash, self.at, self.op, signature, encoded
        )

    @classmethod
    def after(
        cls, previous: FeedEntry | FeedHead | None, device_id: bytes, at: int, op: Op
    ) -> UnsignedEntry:
        """The next entry of a feed whose last entry is ``previous`` (None: an empty feed)."""
        if previous is None:
            return cls(device_id, 1, GENESIS_HASH, at, op)
        return cls(device_id, previous.seq + 1, previous.hash, at, op)


@dataclass(frozen=True, slots=True)
class FeedHead:
    """Where a feed ends: enough to check the next entry without keeping the last one."""

    device_id: bytes
    seq: int
    hash: bytes


@dataclass(frozen=True, slots=True)
class FeedEntry:
    """A signed entry. Build with :meth:`UnsignedEntry.signed` or :func:`decode_entry`."""

    device_id: bytes
    seq: int
    prev_hash: bytes
    at: int
    op: Op
    signature: bytes
    encoded: bytes

    @property
    def hash(self) -> bytes:
        return hashlib.sha256(self.encoded).digest()

    @property
    def head(self) -> FeedHead:
        return FeedHead(self.device_id, self.seq, self.hash)

    def unsigned(self) -> UnsignedEntry:
        return UnsignedEntry(self.device_id, self.seq, self.prev_hash, self.at, self.op)

    def verify(self, identity_public_key: bytes) -> None:
        """Check the identity's signature, and that an added envelope is this identity's too.

        A valid feed signature only says "this identity published this op"; an envelope inside
        is checked on its own so a device cannot be made to store a memory signed by someone
        else (or corrupted) under our identity's feed.
        """
        try:
            VerifyKey(identity_public_key).verify(
                FEED_ENTRY_CONTEXT + self.unsigned().signing_payload(), self.signature
            )
        except (BadSignatureError, ValueError, TypeError):
            raise FeedError(
                f"entry {self.device_id.hex()[:8]}/{self.seq}: signature does not verify "
                "(forged, or signed by another identity)"
            ) from None
        if isinstance(self.op, AddMemory):
            try:
                header = read_header(self.op.envelope)
            except TamperedEnvelope as error:
                raise FeedError(f"entry {self.device_id.hex()[:8]}/{self.seq}: {error}") from None
            if header.author != identity_public_key:
                raise FeedError(
                    f"entry {self.device_id.hex()[:8]}/{self.seq}: the memory inside was written "
                    "by another identity"
                )


def decode_entry(data: bytes) -> FeedEntry:
    """Parse untrusted bytes into an entry (structure only; call ``verify`` for the signature)."""
    if not isinstance(data, bytes) or len(data) > MAX_ENTRY_BYTES:
        raise FeedError("entry is not bytes or exceeds the size limit")
    try:
        raw = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_reject_extension,
            max_array_len=16,
            max_map_len=0,
        )
    except FeedError:
        raise
    except Exception:  # msgpack reports malformed input with many exception types
        raise FeedError("entry is not valid msgpack") from None
    if not isinstance(raw, list) or len(raw) != 7:
        raise FeedError("entry is not a 7-element list")
    version, device_id, seq, prev_hash, at, op_raw, signature = raw
    if version != FEED_VERSION:
        raise FeedError(f"unsupported feed entry version {str(version)[:8]!r}")
    if not (
        isinstance(device_id, bytes)
        and isinstance(prev_hash, bytes)
        and isinstance(signature, bytes)
        and type(seq) is int
        and type(at) is int
    ):
        raise FeedError("entry fields have the wrong types")
    unsigned = UnsignedEntry(device_id, seq, prev_hash, at, _decode_op(op_raw))
    entry = unsigned.signed(signature)
    if entry.encoded != data:
        raise FeedError("entry is not canonically encoded")
    return entry


def check_continuity(previous: FeedEntry | FeedHead | None, entry: FeedEntry) -> None:
    """``entry`` must be the next one of its feed after ``previous`` (None: the feed is empty)."""
    where = f"entry {entry.device_id.hex()[:8]}/{entry.seq}"
    if previous is None:
        if entry.seq != 1 or entry.prev_hash != GENESIS_HASH:
            raise FeedError(f"{where}: a feed must start at seq 1 with the genesis hash")
        return
    if entry.device_id != previous.device_id:
        raise FeedError(f"{where}: continues another device's feed")
    if entry.seq != previous.seq + 1:
        raise FeedError(f"{where}: expected seq {previous.seq + 1} (out of order or a gap)")
    if entry.prev_hash != previous.hash:
        raise FeedError(f"{where}: does not chain to the previous entry (forked or forged feed)")


# -- version vectors ----------------------------------------------------------------------------


class VersionVector(Mapping[bytes, int]):
    """``{device_id: highest contiguous seq}``; absent devices count as 0. Immutable."""

    __slots__ = ("_heads",)

    def __init__(self, heads: Mapping[bytes, int] | Iterable[tuple[bytes, int]] = ()) -> None:
        items = heads.items() if isinstance(heads, Mapping) else heads
        self._heads: dict[bytes, int] = {}
        for device, seq in items:
            if not (isinstance(device, bytes) and len(device) == DEVICE_ID_BYTES):
                raise FeedError("vector: device ids must be 16 bytes")
            if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
                raise FeedError("vector: seq out of range")
            if seq:
                self._heads[device] = max(seq, self._heads.get(device, 0))
        if len(self._heads) > MAX_VECTOR_DEVICES:
            raise FeedError(f"vector names more than {MAX_VECTOR_DEVICES} devices")

    def __getitem__(self, device: bytes) -> int:
        return self._heads.get(device, 0)

    def __contains__(self, device: object) -> bool:
        return device in self._heads

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._heads)

    def __len__(self) -> int:
        return len(self._heads)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VersionVector) and self._heads == other._heads

    def __hash__(self) -> int:
        return hash(frozenset(self._heads.items()))

    def __repr__(self) -> str:
        inner = ", ".join(f"{d.hex()[:8]}:{s}" for d, s in sorted(self._heads.items()))
        return f"VersionVector({inner})"

    def merge(self, other: Mapping[bytes, int]) -> VersionVector:
        """Pointwise maximum: what is known when both sides' knowledge is combined."""
        merged = dict(self._heads)
        for device, seq in other.items():
            merged[device] = max(seq, merged.get(device, 0))
        return VersionVector(merged)

    def missing_for(self, other: Mapping[bytes, int]) -> dict[bytes, tuple[int, int]]:
        """Inclusive seq ranges this side has and ``other`` lacks: ``{device: (first, last)}``."""
        missing = {}
        for device, seq in self._heads.items():
            theirs = other.get(device, 0)
            if seq > theirs:
                missing[device] = (theirs + 1, seq)
        return missing

    def dominates(self, other: Mapping[bytes, int]) -> bool:
        return not VersionVector(other).missing_for(self)

    def lag_behind(self, other: Mapping[bytes, int]) -> int:
        """How many entries ``other`` has that this side lacks."""
        return sum(
            last - first + 1 for first, last in VersionVector(other).missing_for(self).values()
        )

    def to_wire(self) -> dict[str, int]:
        """Hex device ids → seq (what the gossip vector message carries)."""
        return {device.hex(): seq for device, seq in sorted(self._heads.items())}

    @classmethod
    def from_wire(cls, raw: object) -> VersionVector:
        if not isinstance(raw, dict) or len(raw) > MAX_VECTOR_DEVICES:
            raise FeedError(f"vector is not a map of at most {MAX_VECTOR_DEVICES} devices")
        pairs = []
        for key, seq in raw.items():
            if not isinstance(key, str) or len(key) != 2 * DEVICE_ID_BYTES:
                raise FeedError("vector: device ids must be 32 hex characters")
            try:
                pairs.append((bytes.fromhex(key), seq))
            except ValueError:
                raise FeedError("vector: device ids must be hex") from None
        return cls(pairs)


def _reject_extension(code: int, data: bytes) -> object:
    raise FeedError("msgpack extension types are not allowed in feed entries")


def _pack(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed
