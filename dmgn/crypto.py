"""Small cryptographic building blocks shared by the vault format and memory envelopes.

Primitives come from libsodium (pynacl) and hashlib; this module only names and composes them:
XChaCha20-Poly1305 (24-byte random nonces, so random nonces never collide in practice), HKDF with
SHA-256 (RFC 5869) for key separation, and Argon2id for passphrases.
"""

from __future__ import annotations

import hashlib
import hmac

import nacl.bindings as sodium
import nacl.exceptions
import nacl.utils
from argon2.low_level import Type, hash_secret_raw

KEY_BYTES = 32
NONCE_BYTES = sodium.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES  # 24
TAG_BYTES = sodium.crypto_aead_xchacha20poly1305_ietf_ABYTES  # 16


class DecryptionFailed(Exception):
    """Authentication failed: wrong key, or the bytes were changed."""


def random_bytes(n: int) -> bytes:
    return nacl.utils.random(n)


def seal(key: bytes, plaintext: bytes, aad: bytes = b"") -> bytes:
    """XChaCha20-Poly1305 with a fresh random nonce; returns ``nonce || ciphertext || tag``."""
    nonce = random_bytes(NONCE_BYTES)
    return nonce + sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, aad, nonce, key)


def unseal(key: bytes, sealed: bytes, aad: bytes = b"") -> bytes:
    if len(sealed) < NONCE_BYTES + TAG_BYTES:
        raise DecryptionFailed("sealed data is too short")
    nonce, body = sealed[:NONCE_BYTES], sealed[NONCE_BYTES:]
    try:
        return sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(body, aad, nonce, key)
    except nacl.exceptions.CryptoError:
        raise DecryptionFailed("authentication failed") from None


def hkdf_sha256(secret: bytes, info: bytes, length: int = KEY_BYTES, salt: bytes = b"") -> bytes:
    """HKDF (RFC 5869) with SHA-256."""
    prk = hmac.new(salt or bytes(32), secret, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def argon2id(passphrase: bytes, salt: bytes, *, t: int, m_kib: int, p: int) -> bytes:
    return hash_secret_raw(
        passphrase,
        salt,
        time_cost=t,
        memory_cost=m_kib,
        parallelism=p,
        hash_len=KEY_BYTES,
        type=Type.ID,
    )
