"""Feed entries and version vectors (dmgn.feed), as specifications."""

from __future__ import annotations

import os

import msgpack
import pytest
from nacl.signing import SigningKey

from dmgn.feed import (
    FEED_ENTRY_CONTEXT,
    GENESIS_HASH,
    MAX_VECTOR_DEVICES,
    AddMemory,
    Delete,
    FeedEntry,
    FeedError,
    Link,
    Op,
    Unlink,
    UnsignedEntry,
    VersionVector,
    check_continuity,
    decode_entry,
)
from dmgn.identity import master_key
from dmgn.memory import Memory, seal_memory

SEED = bytes(range(32))
KEY = SigningKey(SEED)
IDENTITY = bytes(KEY.verify_key)
DEVICE = bytes(16)
ID_A = "a" * 64
ID_B = "b" * 64


def sign(unsigned: UnsignedEntry, key: SigningKey = KEY) -> FeedEntry:
    # Exactly what vault.Sign(FEED_ENTRY_CONTEXT, payload) computes.
    signature = key.sign(FEED_ENTRY_CONTEXT + unsigned.signing_payload()).signature
    return unsigned.signed(signature)


def envelope(text: str = "hello", key: SigningKey = KEY) -> bytes:
    _, sealed = seal_memory(
        Memory(text, "text", 1),
        signing_key=key,
        master_key=master_key(bytes(key)),
        device_id=DEVICE,
    )
    return sealed


def chain(ops: list[Op], device: bytes = DEVICE) -> list[FeedEntry]:
    entries: list[FeedEntry] = []
    for op in ops:
        entries.append(
            sign(
                UnsignedEntry.after(
                    entries[-1] if entries else None, device, 1000 + len(entries), op
                )
            )
        )
    return entries


def test_every_op_kind_round_trips_through_canonical_bytes() -> None:
    ops: list[Op] = [
        AddMemory(envelope()),
        Link(ID_A, ID_B, "related", 0.5),
        Unlink(ID_A, ID_B, "related"),
        Delete(ID_A),
    ]
    for entry in chain(ops):
        decoded = decode_entry(entry.encoded)
        assert decoded == entry
        assert decoded.hash == entry.hash
        decoded.verify(IDENTITY)


def test_entry_signed_by_another_identity_is_rejected() -> None:
    stranger = SigningKey(os.urandom(32))
    entry = sign(UnsignedEntry(DEVICE, 1, GENESIS_HASH, 1, Delete(ID_A)), stranger)
    with pytest.raises(FeedError, match="signature does not verify"):
        decode_entry(entry.encoded).verify(IDENTITY)


def test_tampered_entry_fails_signature_check() -> None:
    entry = chain([Link(ID_A, ID_B, "related", 1.0)])[0]
    forged = UnsignedEntry(DEVICE, 1, GENESIS_HASH, entry.at, Link(ID_A, ID_B, "evil", 1.0)).signed(
        entry.signature
    )
    with pytest.raises(FeedError, match="signature"):
        decode_entry(forged.encoded).verify(IDENTITY)


def test_add_of_an_envelope_from_another_identity_is_rejected() -> None:
    stranger = SigningKey(os.urandom(32))
    entry = chain([AddMemory(envelope(key=stranger))])[0]
    with pytest.raises(FeedError, match="another identity"):
        entry.verify(IDENTITY)


def test_add_of_a_corrupted_envelope_is_rejected() -> None:
    good = envelope()
    bad = good[:-5] + bytes(5)
    entry = chain([AddMemory(bad)])[0]
    with pytest.raises(FeedError, match=r"signature does not verify|malformed"):
        entry.verify(IDENTITY)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        b"\x90",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"a": 1}),
        msgpack.packb([1, bytes(16), 1, bytes(32), 1, ["nope"], bytes(64)]),
        msgpack.packb([2, bytes(16), 1, bytes(32), 1, ["del", ID_A], bytes(64)]),
        msgpack.packb([1, bytes(15), 1, bytes(32), 1, ["del", ID_A], bytes(64)]),
        msgpack.packb([1, bytes(16), 0, bytes(32), 1, ["del", ID_A], bytes(64)]),
        msgpack.packb([1, bytes(16), 1, bytes(32), 1, ["del", "A" * 64], bytes(64)]),
        msgpack.packb([1, bytes(16), 1, bytes(32), 1, ["link", ID_A, ID_A, "x", 1.0], bytes(64)]),
        msgpack.packb(
            [1, bytes(16), 1, bytes(32), 1, ["link", ID_A, ID_B, "x", float("nan")], bytes(64)]
        ),
        msgpack.packb([1, bytes(16), 1, bytes(32), 1, ["link", ID_A, ID_B, "", 1.0], bytes(64)]),
        msgpack.packb([1, bytes(16), 1, bytes(32), True, ["del", ID_A], bytes(64)]),
        msgpack.packb([1, bytes(16), 1, bytes(32), 1, ["del", ID_A], bytes(63)]),
        msgpack.packb([1, bytes(16), 1, bytes(32), 1, ["del", ID_A], bytes(64)]) + b"\x00",
    ],
    ids=range(16),
)
def test_garbage_bytes_raise_only_feed_error(data: bytes) -> None:
    with pytest.raises(FeedError):
        decode_entry(data)


def test_non_canonical_encoding_is_rejected() -> None:
    entry = chain([Delete(ID_A)])[0]
    # Same values, but the seq as a 64-bit int instead of a fixint: another byte string.
    body = msgpack.unpackb(entry.encoded)
    loose = (
        b"\x97"
        + msgpack.packb(body[0])
        + msgpack.packb(body[1])
        + b"\xcf"
        + (1).to_bytes(8, "big")
        + b"".join(msgpack.packb(v) for v in body[3:])
    )
    assert msgpack.unpackb(loose) == body
    with pytest.raises(FeedError, match="canonical"):
        decode_entry(loose)


def test_continuity_requires_next_seq_and_previous_hash() -> None:
    first, second, third = chain([Delete(ID_A), Delete(ID_B), Delete(ID_A)])
    check_continuity(None, first)
    check_continuity(first, second)
    with pytest.raises(FeedError, match="start at seq 1"):
        check_continuity(None, second)
    with pytest.raises(FeedError, match="expected seq 2"):
        check_continuity(first, third)
    fork = sign(UnsignedEntry(DEVICE, 2, bytes(32), 5, Delete(ID_B)))
    with pytest.raises(FeedError, match="does not chain"):
        check_continuity(first, fork)


def test_vector_missing_for_gives_inclusive_ranges_and_merge_is_pointwise_max() -> None:
    a, b, c = b"a" * 16, b"b" * 16, b"c" * 16
    ours = VersionVector({a: 5, b: 2})
    theirs = VersionVector({a: 3, c: 7})
    assert ours.missing_for(theirs) == {a: (4, 5), b: (1, 2)}
    assert theirs.missing_for(ours) == {c: (1, 7)}
    assert ours.merge(theirs) == VersionVector({a: 5, b: 2, c: 7})
    assert ours.lag_behind(theirs) == 7
    assert not ours.dominates(theirs)
    assert ours.merge(theirs).dominates(theirs)
    assert VersionVector.from_wire(ours.to_wire()) == ours


def test_vector_from_untrusted_input_is_bounded_and_typed() -> None:
    with pytest.raises(FeedError):
        VersionVector.from_wire({"zz" * 16: 1})
    with pytest.raises(FeedError):
        VersionVector.from_wire({"00" * 16: -1})
    with pytest.raises(FeedError):
        VersionVector.from_wire({"00" * 16: True})
    with pytest.raises(FeedError):
        VersionVector.from_wire({os.urandom(16).hex(): 1 for _ in range(MAX_VECTOR_DEVICES + 1)})
