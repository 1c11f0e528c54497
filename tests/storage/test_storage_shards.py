"""dmgn.shards: any k of n shards rebuild the envelope; nothing in a shard or mailbox item is
readable or linkable without the owner's keys."""

from __future__ import annotations

import hashlib
import itertools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmgn.feed import AddMemory, Delete, FeedError, UnsignedEntry
from dmgn.shards import (
    MIN_SHARD_BYTES,
    MailEntry,
    MailKeys,
    ShardError,
    ShardKeys,
    ShardParams,
    decode_shards,
    encode_shards,
    shard_size,
)

KEYS = ShardKeys(bytes(range(32)))


def mid_of(envelope: bytes) -> str:
    return hashlib.sha256(envelope).hexdigest()


@settings(max_examples=40, deadline=None)
@given(
    envelope=st.binary(min_size=1, max_size=5000),
    kn=st.sampled_from([(1, 2), (2, 4), (3, 6), (4, 7), (5, 10)]),
    data=st.data(),
)
def test_any_k_shards_rebuild_the_envelope(
    envelope: bytes, kn: tuple[int, int], data: st.DataObject
) -> None:
    params = ShardParams(*kn)
    shards = encode_shards(envelope, KEYS, params)
    assert len(shards) == params.n
    assert len({len(s) for s in shards}) == 1
    assert len(shards[0]) == shard_size(len(envelope), params.k)
    chosen = data.draw(st.permutations(range(params.n)))[: params.k]
    rebuilt = decode_shards(mid_of(envelope), {i: shards[i] for i in chosen}, KEYS, params)
    assert rebuilt == envelope
    assert encode_shards(envelope, KEYS, params) == shards  # deterministic: audits recompute


def test_sizes_fall_in_power_of_two_buckets() -> None:
    sizes = {shard_size(n, 3) - 16 for n in range(1, 20000, 97)}
    assert min(sizes) == MIN_SHARD_BYTES
    assert all(s & (s - 1) == 0 for s in sizes)
    assert len(sizes) <= 6


def test_shards_hide_the_envelope_and_cannot_be_linked() -> None:
    envelope = b"header: author device time type | " + os.urandom(2000)
    mid = mid_of(envelope)
    shards = encode_shards(envelope, KEYS, ShardParams())
    for shard in shards:
        assert b"header" not in shard and bytes.fromhex(mid) not in shard
    ids = {KEYS.shard_id(mid, i) for i in range(6)}
    assert len(ids) == 6 and bytes.fromhex(mid) not in b"".join(ids)
    other = ShardKeys(os.urandom(32))
    assert other.shard_id(mid, 0) != KEYS.shard_id(mid, 0)


def test_a_corrupt_shard_is_pinned_and_too_few_good_ones_fail() -> None:
    envelope = os.urandom(3000)
    mid = mid_of(envelope)
    params = ShardParams()
    shards = encode_shards(envelope, KEYS, params)
    corrupt = bytes([shards[1][0] ^ 1]) + shards[1][1:]
    assert not KEYS.check(mid, 1, corrupt) and KEYS.check(mid, 1, shards[1])
    assert not KEYS.check(mid, 2, shards[1])  # a shard served under another index
    picked = {0: shards[0], 1: corrupt, 2: shards[2], 5: shards[5]}
    assert decode_shards(mid, picked, KEYS, params) == envelope
    with pytest.raises(ShardError, match="2 good shards"):
        decode_shards(mid, {0: shards[0], 1: corrupt, 2: shards[2]}, KEYS, params)
    with pytest.raises(ShardError):
        decode_shards(mid, dict(enumerate(shards)), ShardKeys(os.urandom(32)), params)


def test_all_combinations_of_three_of_six() -> None:
    envelope = os.urandom(777)
    shards = encode_shards(envelope, KEYS, ShardParams())
    for chosen in itertools.combinations(range(6), 3):
        got = decode_shards(mid_of(envelope), {i: shards[i] for i in chosen}, KEYS, ShardParams())
        assert got == envelope


def test_mailbox_items_are_sealed_in_place_and_thin_adds_complete() -> None:
    from nacl.signing import SigningKey

    key = SigningKey(os.urandom(32))
    mail = MailKeys(os.urandom(32))
    device = os.urandom(16)
    envelope = os.urandom(500)
    unsigned = UnsignedEntry.after(None, device, 1, AddMemory(envelope))
    entry = unsigned.signed(key.sign(b"x" + unsigned.signing_payload()).signature)
    thin = MailEntry.of(entry)
    assert thin.memory_id == entry.op.memory_id  # type: ignore[union-attr]
    stream = mail.stream_id(device)
    item = mail.seal(thin)
    assert len(item) in (256, 512) and device not in item and envelope not in item
    opened = mail.open(stream, 1, item)
    assert opened.complete(envelope).encoded == entry.encoded
    with pytest.raises(FeedError, match="needs memory"):
        opened.complete(os.urandom(500))
    with pytest.raises(FeedError, match="does not decrypt"):
        mail.open(stream, 2, item)  # moved to another place in the stream
    with pytest.raises(FeedError):
        MailKeys(os.urandom(32)).open(stream, 1, item)
    delete = UnsignedEntry.after(entry, device, 2, Delete(entry.op.memory_id))  # type: ignore[union-attr]
    whole = MailEntry.of(delete.signed(bytes(64)))
    assert mail.open(stream, 2, mail.seal(whole)).complete().encoded == whole.full
