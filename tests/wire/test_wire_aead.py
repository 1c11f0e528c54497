"""The transport AEAD (OpenSSL's ChaCha20-Poly1305 through `cryptography`, issue 17) gives
libsodium's bytes exactly, refuses what libsodium refuses, and survives rekey and copies."""

from __future__ import annotations

import copy

import nacl.bindings as sodium
import pytest
from hypothesis import given
from hypothesis import strategies as st

from wire import DecryptError
from wire._noise import CipherState

_MAX_NONCE = 2**64 - 1


def nonce_bytes(n: int) -> bytes:
    return bytes(4) + n.to_bytes(8, "little")


keys = st.binary(min_size=32, max_size=32)


@given(
    key=keys,
    nonce=st.integers(0, _MAX_NONCE - 1),
    ad=st.binary(max_size=64),
    plaintext=st.binary(max_size=2000),
)
def test_ciphertexts_are_libsodiums(key: bytes, nonce: int, ad: bytes, plaintext: bytes) -> None:
    sender, receiver = CipherState(key), CipherState(key)
    sender.set_nonce(nonce)
    receiver.set_nonce(nonce)
    ciphertext = sender.encrypt_with_ad(ad, plaintext)
    assert ciphertext == sodium.crypto_aead_chacha20poly1305_ietf_encrypt(
        plaintext, ad, nonce_bytes(nonce), key
    )
    assert receiver.decrypt_with_ad(ad, ciphertext) == plaintext
    assert sender.nonce == receiver.nonce == nonce + 1


@given(key=keys, plaintext=st.binary(min_size=1, max_size=300), data=st.data())
def test_any_changed_byte_fails_and_leaves_the_nonce(
    key: bytes, plaintext: bytes, data: st.DataObject
) -> None:
    ciphertext = CipherState(key).encrypt_with_ad(b"ad", plaintext)
    index = data.draw(st.integers(0, len(ciphertext) - 1))
    flip = data.draw(st.integers(1, 255))
    tampered = bytearray(ciphertext)
    tampered[index] ^= flip
    receiver = CipherState(key)
    with pytest.raises(DecryptError, match="authentication failed"):
        receiver.decrypt_with_ad(b"ad", bytes(tampered))
    with pytest.raises(DecryptError):
        receiver.decrypt_with_ad(b"other ad", ciphertext)
    assert receiver.nonce == 0  # spec 5.1: a failed decryption does not advance n
    assert receiver.decrypt_with_ad(b"ad", ciphertext) == plaintext


def test_rekey_is_the_specs_and_both_ends_agree() -> None:
    key = bytes(range(32))
    a, b = CipherState(key), CipherState(key)
    a.rekey()
    b.rekey()
    expected = sodium.crypto_aead_chacha20poly1305_ietf_encrypt(
        bytes(32), b"", nonce_bytes(_MAX_NONCE), key
    )[:32]
    assert a.encrypt_with_ad(b"", b"after") == sodium.crypto_aead_chacha20poly1305_ietf_encrypt(
        b"after", b"", nonce_bytes(0), expected
    )
    b.set_nonce(1)  # a has used nonce 0 above
    assert b.decrypt_with_ad(b"", a.encrypt_with_ad(b"", b"x")) == b"x"


def test_a_copy_goes_on_like_the_original() -> None:
    original = CipherState(bytes(32))
    original.encrypt_with_ad(b"", b"one")
    twin = copy.deepcopy(original)
    assert twin.encrypt_with_ad(b"", b"two") == original.encrypt_with_ad(b"", b"two")
    assert copy.deepcopy(CipherState()).encrypt_with_ad(b"", b"clear") == b"clear"


def test_aesgcm_is_spec_12_4_big_endian_nonces_and_its_own_rekey() -> None:
    """AES-256-GCM through the same CipherState, checked against the raw AEAD: nonce = 32 zero
    bits + the counter big-endian (ChaChaPoly's is little-endian), rekey = ENCRYPT(k, 2^64-1,
    empty, 32 zero bytes)[:32], and the counter is left alone by a rekey."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from wire._noise import CIPHERS

    key = bytes(range(32, 64))
    state = CipherState(key, CIPHERS["AESGCM"])
    for n in range(3):
        nonce = bytes(4) + n.to_bytes(8, "big")
        assert state.encrypt_with_ad(b"ad", b"m%d" % n) == AESGCM(key).encrypt(
            nonce, b"m%d" % n, b"ad"
        )
    state.rekey()
    rekeyed = AESGCM(key).encrypt(bytes(4) + (2**64 - 1).to_bytes(8, "big"), bytes(32), b"")[:32]
    assert state.nonce == 3
    assert state.encrypt_with_ad(b"", b"after") == AESGCM(rekeyed).encrypt(
        bytes(4) + (3).to_bytes(8, "big"), b"after", b""
    )
