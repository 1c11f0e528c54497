"""Memory envelopes: sealed, signed, content-addressed; tampering is caught on read."""

from __future__ import annotations

import contextlib
import hashlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from dmgn.errors import InvalidInput, TamperedEnvelope
from dmgn.identity import master_key, new_seed
from dmgn.memory import Memory, open_memory, read_header, seal_memory

SEED = new_seed()
KEY = SigningKey(SEED)
MASTER = master_key(SEED)
DEVICE = bytes(16)


def seal(content: str = "Alice prefers green tea", **kw: object) -> tuple[str, bytes]:
    memory = Memory(
        content, str(kw.get("type", "text")), 1_700_000_000_000_000_000, {"source": "chat"}, None
    )
    return seal_memory(memory, signing_key=KEY, master_key=MASTER, device_id=DEVICE)


def test_round_trip_and_id_is_sha256_hex_of_envelope() -> None:
    memory_id, envelope = seal()
    assert memory_id == hashlib.sha256(envelope).hexdigest()
    assert len(memory_id) == 64 and memory_id == memory_id.lower()
    header, memory = open_memory(
        envelope, master_key=MASTER, expected_author=bytes(KEY.verify_key), expected_id=memory_id
    )
    assert memory.content == "Alice prefers green tea"
    assert memory.metadata == {"source": "chat"}
    assert header.type == "text" and header.created_at == 1_700_000_000_000_000_000


def test_no_plaintext_in_envelope() -> None:
    _, envelope = seal("a very distinctive sentence about zanzibar")
    assert b"zanzibar" not in envelope and b"chat" not in envelope


def test_same_content_twice_gets_different_ids() -> None:
    assert seal()[0] != seal()[0]  # random per-memory key and nonces


def test_any_flipped_byte_is_rejected() -> None:
    memory_id, envelope = seal()
    author = bytes(KEY.verify_key)
    for position in range(0, len(envelope), 7):
        broken = bytearray(envelope)
        broken[position] ^= 0x40
        with pytest.raises(TamperedEnvelope):
            open_memory(
                bytes(broken), master_key=MASTER, expected_author=author, expected_id=memory_id
            )
        # Even without the expected id, the signature or AEAD must catch it.
        with pytest.raises(TamperedEnvelope):
            open_memory(bytes(broken), master_key=MASTER, expected_author=author)


def test_retyped_envelope_with_valid_structure_fails_signature() -> None:
    _, envelope = seal()
    header, wrapped, payload, signature = msgpack.unpackb(envelope)
    header[4] = "document"
    forged = msgpack.packb([header, wrapped, payload, signature], use_bin_type=True)
    with pytest.raises(TamperedEnvelope, match="signature does not verify"):
        read_header(forged)


def test_envelope_by_another_identity_is_refused() -> None:
    _, envelope = seal()
    with pytest.raises(TamperedEnvelope, match="another identity"):
        open_memory(envelope, master_key=MASTER, expected_author=bytes(32))


def test_bad_memory_type_and_empty_content_are_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="unknown memory type"):
        seal(type="diary")
    with pytest.raises(InvalidInput, match="needs some content"):
        seal("   ")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_garbage_never_raises_anything_but_tampered(data: bytes) -> None:
    with contextlib.suppress(TamperedEnvelope):
        read_header(data)
