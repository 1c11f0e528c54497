"""Signed, expiring DHT records (dmgn.peer_record), as specifications."""

from __future__ import annotations

import os

import msgpack
import pytest
from nacl.signing import SigningKey

from dmgn.peer_record import (
    MAX_ADDRS,
    MAX_CLOCK_SKEW,
    MAX_PROVIDER_ENTRIES,
    MAX_RECORD_BYTES,
    MAX_RECORD_LIFETIME,
    RECORD_CONTEXT,
    PeerRecord,
    ProviderLocator,
    ProviderRecord,
    RecordError,
    decode_peer_record,
    decode_provider_record,
    decode_sealed_record,
    peer_key,
    provider_key,
    sealed_key,
)

KEY = SigningKey(bytes(range(32)))
IDENTITY = bytes(KEY.verify_key)
NOW = 1_800_000_000


def peer(
    device: bytes | None = None,
    *,
    key: SigningKey = KEY,
    issued: int = NOW,
    ttl: int = 3600,
    addrs: tuple[str, ...] = ("ws://127.0.0.1:4001",),
) -> PeerRecord:
    unsigned = PeerRecord(
        bytes(key.verify_key), device or os.urandom(16), os.urandom(32), addrs, issued, issued + ttl
    )
    # Exactly what vault.Sign(RECORD_CONTEXT, payload) returns.
    return unsigned.signed(key.sign(RECORD_CONTEXT + unsigned.signing_payload()).signature)


def provider(entries: list[PeerRecord], *, key: SigningKey = KEY) -> ProviderRecord:
    record = ProviderRecord(bytes(key.verify_key), tuple(entries), NOW, NOW + 3600)
    return record.signed(key.sign(RECORD_CONTEXT + record.signing_payload()).signature)


def test_peer_record_round_trips_and_verifies() -> None:
    record = peer()
    decoded = decode_peer_record(record.encode(), now=NOW + 10, expected_device=record.device_id)
    assert decoded == record


def test_tampered_peer_record_is_rejected() -> None:
    record = peer()
    data = record.encode().replace(b"127.0.0.1", b"127.0.0.9")
    with pytest.raises(RecordError, match="signature does not verify"):
        decode_peer_record(data, now=NOW)


def test_expired_or_future_or_overlong_records_are_rejected() -> None:
    record = peer(ttl=60)
    with pytest.raises(RecordError, match="expired"):
        decode_peer_record(record.encode(), now=NOW + 61)
    with pytest.raises(RecordError, match="future"):
        decode_peer_record(record.encode(), now=NOW - 3600)
    with pytest.raises(RecordError, match="validity"):
        peer(ttl=MAX_RECORD_LIFETIME + 1)


def test_record_under_another_devices_key_is_rejected() -> None:
    record = peer()
    with pytest.raises(RecordError, match="another device"):
        decode_peer_record(record.encode(), now=NOW, expected_device=os.urandom(16))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        msgpack.packb([1, "peer"]),
        msgpack.packb({"x": 1}),
        b"\x00" * (MAX_RECORD_BYTES + 1),
        msgpack.packb(
            [1, "peer", IDENTITY, bytes(16), bytes(32), ["http://x:1"], NOW, NOW + 1, bytes(64)]
        ),
        msgpack.packb([1, "peer", IDENTITY, bytes(16), bytes(32), [], NOW, NOW + 1, bytes(64)]),
        msgpack.packb([1, "peer", IDENTITY, bytes(16), bytes(32), ["ws://x:1"], NOW, NOW + 1, b""]),
    ],
)
def test_garbage_raises_only_record_error(data: bytes) -> None:
    with pytest.raises(RecordError):
        decode_peer_record(data, now=NOW)
    with pytest.raises(RecordError):
        decode_provider_record(data, now=NOW)


def test_addresses_are_bounded_and_must_be_ws_urls() -> None:
    with pytest.raises(RecordError):
        peer(addrs=tuple(f"ws://10.0.0.{i}:1" for i in range(MAX_ADDRS + 1)))
    with pytest.raises(RecordError, match="ws://"):
        peer(addrs=("tcp://10.0.0.1:4001",))


def test_provider_record_lists_verified_entries_and_drops_stale_ones() -> None:
    fresh, stale = peer(ttl=3600), peer(ttl=10)
    record = provider([fresh, stale])
    decoded = decode_provider_record(record.encode(), now=NOW + 60, identity=IDENTITY)
    assert decoded.entries == (fresh,)


def test_provider_record_signed_by_another_identity_is_rejected() -> None:
    stranger = SigningKey(os.urandom(32))
    record = provider([peer(key=stranger)], key=stranger)
    with pytest.raises(RecordError, match="another identity"):
        decode_provider_record(record.encode(), now=NOW, identity=IDENTITY)
    forged = record.encode().replace(bytes(stranger.verify_key), IDENTITY)
    with pytest.raises(RecordError, match="signature"):
        decode_provider_record(forged, now=NOW, identity=IDENTITY)


def test_merging_replaces_a_devices_entry_and_stays_under_the_dht_size_cap() -> None:
    device = os.urandom(16)
    old = peer(device, issued=NOW - 100)
    new = peer(device)
    merged = ProviderRecord.merged(IDENTITY, provider([old]), new, now=NOW, ttl=3600)
    assert merged.entries == (new,)
    many = [
        peer(
            addrs=tuple(f"ws://host-{i}-{j}.example.org:4001" for j in range(MAX_ADDRS)),
            issued=NOW - i,
        )
        for i in range(30)
    ]
    current = ProviderRecord(IDENTITY, tuple(many[1:5]), NOW, NOW + 60)
    for entry in many:
        current = ProviderRecord.merged(IDENTITY, current, entry, now=NOW, ttl=3600)
    signed = current.signed(KEY.sign(RECORD_CONTEXT + current.signing_payload()).signature)
    assert len(signed.encode()) <= MAX_RECORD_BYTES
    assert many[-1] in signed.entries  # the one just merged is always kept


def test_dht_keys_do_not_reveal_the_identity() -> None:
    assert IDENTITY not in provider_key(IDENTITY)
    assert peer_key(bytes(16)).startswith(b"dmgn-peer:")


# -- sealed (blinded) provider records ---------------------------------------------------------


LOCATOR = ProviderLocator(bytes(range(32, 64)))


def test_sealed_provider_record_round_trips_for_holders_of_the_locator() -> None:
    entry = peer()
    inner = provider([entry])
    sealed = LOCATOR.seal(inner)
    decoded = decode_sealed_record(sealed.encode(), now=NOW)
    assert decoded.key == LOCATOR.key == sealed_key(LOCATOR.public_key)
    assert LOCATOR.open(decoded, now=NOW, identity=IDENTITY) == inner


def test_sealed_record_reveals_nothing_of_the_identity_to_dht_nodes() -> None:
    entry = peer(addrs=("ws://198.51.100.7:4001",))
    data = LOCATOR.seal(provider([entry])).encode()
    for secret in (IDENTITY, entry.device_id, entry.noise_key, b"198.51.100.7"):
        assert secret not in data
        assert secret not in LOCATOR.key
    assert LOCATOR.key != provider_key(IDENTITY)


def test_sealed_record_opens_only_with_its_locator_and_only_for_its_identity() -> None:
    sealed = LOCATOR.seal(provider([peer()]))
    other = ProviderLocator(bytes(32))
    with pytest.raises(RecordError, match="another locator"):
        other.open(sealed, now=NOW, identity=IDENTITY)
    stranger = SigningKey(bytes(range(1, 33)))
    with pytest.raises(RecordError, match="another identity"):
        LOCATOR.open(LOCATOR.seal(provider([peer()], key=stranger)), now=NOW, identity=IDENTITY)


def test_tampered_or_future_dated_sealed_records_are_refused() -> None:
    data = LOCATOR.seal(provider([peer()])).encode()
    tampered = data[:-80] + bytes([data[-80] ^ 1]) + data[-79:]
    with pytest.raises(RecordError):
        decode_sealed_record(tampered, now=NOW)
    # Issued at NOW: accepted from NOW - MAX_CLOCK_SKEW on, refused before that.
    decode_sealed_record(data, now=NOW - MAX_CLOCK_SKEW)
    with pytest.raises(RecordError, match="future"):
        decode_sealed_record(data, now=NOW - MAX_CLOCK_SKEW - 1)
    assert MAX_CLOCK_SKEW <= 60


def test_a_full_provider_record_still_fits_the_dht_once_sealed() -> None:
    current = None
    for _ in range(MAX_PROVIDER_ENTRIES + 5):
        entry = peer(addrs=tuple(f"ws://[2001:db8::{i}]:4001" for i in range(MAX_ADDRS)))
        current = ProviderRecord.merged(IDENTITY, current, entry, now=NOW, ttl=3600)
    assert current is not None
    signed = current.signed(KEY.sign(RECORD_CONTEXT + current.signing_payload()).signature)
    assert len(LOCATOR.seal(signed).encode()) <= MAX_RECORD_BYTES
