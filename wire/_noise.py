"""The Noise Protocol Framework (revision 34), as a pure state machine over bytes.

Spec: https://noiseprotocol.org/noise.html (rev 34, 2018-07-11). The objects
mirror the spec's sections one to one so the code can be read side by side
with it: `CipherState` (5.1), `SymmetricState` (5.2), `HandshakeState` (5.3),
handshake patterns (7) and the ``pskN`` modifier (9).

Choices and simplifications:

- DH is X25519 only (pynacl / libsodium). The cipher is ChaChaPoly
  (ChaCha20-Poly1305 IETF, RFC 8439; spec 12.3) or AESGCM (AES-256-GCM, spec 12.4),
  both computed by OpenSSL through ``cryptography``: ChaChaPoly gives the same bytes
  as libsodium's (the vectors check it) at 2.4x its speed here, and AES-GCM on a CPU
  with AES instructions is 3.5x faster again, which is what a large message costs on
  top of raw WebSocket (issue 17; deviations from the design, docs/design.md, which names
  pynacl and ChaChaPoly: the secure channel picks the suite, see
  `wire._secure_channel.preferred_suite`). The hash is any of BLAKE2b, BLAKE2s,
  SHA256, SHA512 (hashlib), so the public cacophony vectors for all of them run
  through this exact code; dmgn itself uses ``Noise_XX_25519_{ChaChaPoly,AESGCM}_BLAKE2b``.
- Patterns: NN, IK, XX, each optionally with ``pskN`` modifiers. Adding a
  pattern is one entry in `_PATTERNS`; nothing else knows pattern names.
- libsodium refuses a DH whose result is all zeros (a low-order public key).
  The spec allows rejecting it (section 12.1); we do, as a `HandshakeError`.
- Nonce 2**64-1 is reserved by the spec (section 5.1); using it is
  `NonceExhausted`, as is any attempt after it. `CipherState.rekey` is the
  spec's REKEY() and does not touch the nonce.
- A failed decryption leaves the nonce unchanged, as the spec requires, but
  callers above this module treat any failure as fatal for the session.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import nacl.bindings
import nacl.exceptions
import nacl.utils
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from wire._errors import DecryptError, HandshakeError, NonceExhausted

__all__ = [
    "CIPHERS",
    "DHLEN",
    "CipherFunctions",
    "CipherState",
    "HandshakeState",
    "KeyPair",
    "NoiseProtocol",
    "SymmetricState",
]

DHLEN = 32  # X25519 public keys and shared secrets (spec 12.1)
_KEYLEN = 32  # ChaChaPoly and AESGCM (AES-256) key size (spec 12.3, 12.4)
TAGLEN = 16  # the AEAD tag appended to every ciphertext, both ciphers (spec 5.1, 12.3, 12.4)
_MAX_NONCE = 2**64 - 1  # reserved by spec 5.1: never used to encrypt transport data
# Spec section 3: every Noise message, handshake or transport, is at most 65535 bytes.
MAX_NOISE_MESSAGE = 65535
_PSK_LEN = 32  # spec 9.2: pre-shared keys are exactly 32 bytes
_ZEROS32 = bytes(32)


@dataclass(frozen=True, slots=True)
class CipherFunctions:
    """Spec 12.3 / 12.4: one AEAD and how it writes the 64-bit counter into its nonce."""

    name: str
    aead: type[ChaCha20Poly1305] | type[AESGCM]
    nonce: struct.Struct

    def __deepcopy__(self, memo: dict[int, object]) -> CipherFunctions:
        return self  # immutable (a struct.Struct cannot be copied, and need not be)


#: ``ChaChaPoly``: 32 zero bits + little-endian n; ``AESGCM``: 32 zero bits + big-endian n.
CIPHERS: dict[str, CipherFunctions] = {
    "ChaChaPoly": CipherFunctions("ChaChaPoly", ChaCha20Poly1305, struct.Struct("<4xQ")),
    "AESGCM": CipherFunctions("AESGCM", AESGCM, struct.Struct(">4xQ")),
}
_CHACHAPOLY = CIPHERS["ChaChaPoly"]


@dataclass(frozen=True, slots=True)
class KeyPair:
    """An X25519 key pair (raw 32-byte private scalar and public key)."""

    private: bytes
    public: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        return cls.from_private(nacl.utils.random(DHLEN))

    @classmethod
    def from_private(cls, private: bytes) -> KeyPair:
        if len(private) != DHLEN:
            raise HandshakeError(f"X25519 private key must be {DHLEN} bytes")
        return cls(private, nacl.bindings.crypto_scalarmult_base(private))

    def __repr__(self) -> str:  # never print secrets
        return f"KeyPair(public={self.public.hex()})"


def _dh(key_pair: KeyPair, public: bytes) -> bytes:
    try:
        return nacl.bindings.crypto_scalarmult(key_pair.private, public)
    except nacl.exceptions.CryptoError as exc:
        # libsodium rejects an all-zero result, i.e. a low-order point.
        raise HandshakeError("peer sent a low-order X25519 public key") from exc


class CipherState:
    """Spec 5.1: a key ``k`` (or none) and a 64-bit counter nonce ``n``."""

    __slots__ = ("_aead", "_functions", "_k", "_n", "_nonce")

    def __init__(self, key: bytes | None = None, functions: CipherFunctions = _CHACHAPOLY) -> None:
        self._functions = functions
        self._nonce = functions.nonce  # here, not behind an attribute, for the per-frame path
        self._k: bytes | None = None
        #: The cipher keyed with ``_k`` (made once per key, not per message).
        self._aead: ChaCha20Poly1305 | AESGCM | None = None
        self._n = 0
        if key is not None:
            self.initialize_key(key)

    def __deepcopy__(self, memo: dict[int, object]) -> CipherState:
        # The OpenSSL cipher object cannot be copied; a copy makes its own from the key.
        twin = CipherState(self._k, self._functions)
        twin._n = self._n
        return twin

    @property
    def functions(self) -> CipherFunctions:
        return self._functions

    def initialize_key(self, key: bytes | None) -> None:
        self._k = key
        self._aead = None if key is None else self._functions.aead(key)
        self._n = 0

    def has_key(self) -> bool:
        return self._k is not None

    @property
    def nonce(self) -> int:
        return self._n

    def set_nonce(self, nonce: int) -> None:
        if not 0 <= nonce <= _MAX_NONCE:
            raise NonceExhausted("nonce out of range")
        self._n = nonce

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes | memoryview) -> bytes:
        if self._aead is None:
            return bytes(plaintext)
        if self._n >= _MAX_NONCE:
            raise NonceExhausted("cipher state used every nonce; the session must be replaced")
        # The AEAD call inline (no helper): this runs for every transport frame.
        ciphertext = self._aead.encrypt(self._nonce.pack(self._n), plaintext, ad)
        self._n += 1
        return ciphertext

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes | memoryview) -> bytes:
        if self._aead is None:
            return bytes(ciphertext)
        if self._n >= _MAX_NONCE:
            raise NonceExhausted("cipher state used every nonce; the session must be replaced")
        if len(ciphertext) < TAGLEN:
            raise DecryptError("ciphertext shorter than its authentication tag")
        try:
            plaintext = self._aead.decrypt(self._nonce.pack(self._n), ciphertext, ad)
        except InvalidTag:
            raise DecryptError(
                "authentication failed (tampered, truncated, replayed or reordered data)"
            ) from None
        self._n += 1
        return plaintext

    def rekey(self) -> None:
        """Spec 4.2 REKEY(k): k = ENCRYPT(k, maxnonce, zerolen, zeros)[:32]."""
        if self._aead is None:
            raise HandshakeError("cannot rekey a cipher state without a key")
        key = self._aead.encrypt(self._nonce.pack(_MAX_NONCE), _ZEROS32, b"")[:_KEYLEN]
        self._k, self._aead = key, self._functions.aead(key)


@dataclass(frozen=True, slots=True)
class _Hash:
    hashlib_name: str

    @property
    def hashlen(self) -> int:
        return hashlib.new(self.hashlib_name).digest_size

    def hash(self, data: bytes) -> bytes:
        return hashlib.new(self.hashlib_name, data).digest()

    def hmac(self, key: bytes, data: bytes) -> bytes:
        # hmac uses the hash's own block size (128 for BLAKE2b/SHA512, 64 otherwise),
        # which is what spec 4.3 requires.
        return hmac.digest(key, data, self.hashlib_name)

    def hkdf(self, chaining_key: bytes, ikm: bytes, outputs: int) -> list[bytes]:
        """Spec 4.3 HKDF with 2 or 3 outputs."""
        temp_key = self.hmac(chaining_key, ikm)
        out = [self.hmac(temp_key, b"\x01")]
        for i in range(2, outputs + 1):
            out.append(self.hmac(temp_key, out[-1] + bytes([i])))
        return out


_HASHES: dict[str, _Hash] = {
    "BLAKE2b": _Hash("blake2b"),
    "BLAKE2s": _Hash("blake2s"),
    "SHA256": _Hash("sha256"),
    "SHA512": _Hash("sha512"),
}

# Spec 7: message patterns. Pre-messages first (tokens known out of band),
# then the handshake messages, alternating initiator -> responder -> ...
_Tokens = tuple[str, ...]
_PATTERNS: dict[str, tuple[tuple[_Tokens, _Tokens], tuple[_Tokens, ...]]] = {
    "NN": (((), ()), (("e",), ("e", "ee"))),
    "IK": (((), ("s",)), (("e", "es", "s", "ss"), ("e", "ee", "se"))),
    "XX": (((), ()), (("e",), ("e", "ee", "s", "es"), ("s", "se"))),
}


@dataclass(frozen=True, slots=True)
class NoiseProtocol:
    """A parsed protocol name such as ``Noise_XX_25519_ChaChaPoly_BLAKE2b``."""

    name: bytes
    pre_messages: tuple[tuple[str, ...], tuple[str, ...]]
    messages: tuple[tuple[str, ...], ...]
    hash: _Hash
    cipher: CipherFunctions = _CHACHAPOLY

    @property
    def uses_psk(self) -> bool:
        return any("psk" in m for m in self.messages)

    @classmethod
    def from_name(cls, name: str) -> NoiseProtocol:
        parts = name.split("_")
        if len(parts) != 5 or parts[0] != "Noise":
            raise HandshakeError(f"not a Noise protocol name: {name!r}")
        _, pattern_name, dh, cipher, hash_name = parts
        if dh != "25519" or cipher not in CIPHERS or hash_name not in _HASHES:
            raise HandshakeError(f"unsupported Noise suite: {name!r}")
        base = pattern_name
        psks: list[int] = []
        if "psk" in pattern_name:
            base, _, mods = pattern_name.partition("psk")
            for mod in ("psk" + mods).split("+"):
                if not mod.startswith("psk") or not mod[3:].isdigit():
                    raise HandshakeError(f"unsupported pattern modifier: {mod!r}")
                psks.append(int(mod[3:]))
        if base not in _PATTERNS:
            raise HandshakeError(f"unsupported handshake pattern: {base!r}")
        pre, messages = _PATTERNS[base]
        msgs = [list(m) for m in messages]
        for position in psks:
            # Spec 9.2: psk0 goes first in the first message, pskN last in message N.
            if position == 0:
                msgs[0].insert(0, "psk")
            elif position <= len(msgs):
                msgs[position - 1].append("psk")
            else:
                raise HandshakeError(f"psk{position} is past the end of {base}")
        return cls(
            name.encode("ascii"),
            pre,
            tuple(tuple(m) for m in msgs),
            _HASHES[hash_name],
            CIPHERS[cipher],
        )


class SymmetricState:
    """Spec 5.2: chaining key ``ck``, handshake hash ``h`` and a `CipherState`."""

    __slots__ = ("_ck", "_functions", "_h", "_hash", "cipher_state")

    def __init__(self, protocol: NoiseProtocol) -> None:
        self._hash = protocol.hash
        self._functions = protocol.cipher
        hashlen = self._hash.hashlen
        if len(protocol.name) <= hashlen:
            self._h = protocol.name.ljust(hashlen, b"\x00")
        else:
            self._h = self._hash.hash(protocol.name)
        self._ck = self._h
        self.cipher_state = CipherState(functions=self._functions)

    def _truncate(self, key: bytes) -> bytes:
        return key[:_KEYLEN]  # spec 5.2: HASHLEN 64 keys are truncated to 32 bytes

    def mix_key(self, ikm: bytes) -> None:
        self._ck, temp_k = self._hash.hkdf(self._ck, ikm, 2)
        self.cipher_state.initialize_key(self._truncate(temp_k))

    def mix_hash(self, data: bytes) -> None:
        self._h = self._hash.hash(self._h + data)

    def mix_key_and_hash(self, ikm: bytes) -> None:
        self._ck, temp_h, temp_k = self._hash.hkdf(self._ck, ikm, 3)
        self.mix_hash(temp_h)
        self.cipher_state.initialize_key(self._truncate(temp_k))

    @property
    def handshake_hash(self) -> bytes:
        return self._h

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cipher_state.encrypt_with_ad(self._h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self.cipher_state.decrypt_with_ad(self._h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        temp_k1, temp_k2 = self._hash.hkdf(self._ck, b"", 2)
        return (
            CipherState(self._truncate(temp_k1), self._functions),
            CipherState(self._truncate(temp_k2), self._functions),
        )


class HandshakeState:
    """Spec 5.3, driven one message at a time.

    `write_message` / `read_message` raise `HandshakeError` when called out of
    turn. Once the last pattern message is processed, `complete` is true and
    `cipher_states` holds ``(initiator_to_responder, responder_to_initiator)``;
    `send_cipher` / `receive_cipher` pick the right one for this side.
    """

    def __init__(
        self,
        protocol: NoiseProtocol,
        *,
        initiator: bool,
        prologue: bytes = b"",
        s: KeyPair | None = None,
        e: KeyPair | None = None,
        rs: bytes | None = None,
        re: bytes | None = None,
        psk: bytes | None = None,
    ) -> None:
        self.protocol = protocol
        self.initiator = initiator
        self.s, self.e, self.rs, self.re = s, e, rs, re
        if protocol.uses_psk and (psk is None or len(psk) != _PSK_LEN):
            raise HandshakeError(f"this pattern needs a {_PSK_LEN}-byte pre-shared key")
        self._psk = psk
        self._symmetric = SymmetricState(protocol)
        self._symmetric.mix_hash(prologue)
        initiator_pre, responder_pre = protocol.pre_messages
        for tokens, local in ((initiator_pre, initiator), (responder_pre, not initiator)):
            for token in tokens:
                key = self._pre_message_key(token, local)
                self._symmetric.mix_hash(key)
        self._message_index = 0
        self.cipher_states: tuple[CipherState, CipherState] | None = None

    def _pre_message_key(self, token: str, local: bool) -> bytes:
        if local:
            pair = self.s if token == "s" else self.e
            key = pair.public if pair is not None else None
        else:
            key = self.rs if token == "s" else self.re
        if key is None:
            raise HandshakeError(f"pre-message key {token!r} is missing")
        return key

    @property
    def complete(self) -> bool:
        return self.cipher_states is not None

    @property
    def handshake_hash(self) -> bytes:
        return self._symmetric.handshake_hash

    @property
    def remote_static(self) -> bytes | None:
        return self.rs

    def is_my_turn(self) -> bool:
        return not self.complete and (self._message_index % 2 == 0) == self.initiator

    @property
    def send_cipher(self) -> CipherState:
        return self._transport_pair()[0 if self.initiator else 1]

    @property
    def receive_cipher(self) -> CipherState:
        return self._transport_pair()[1 if self.initiator else 0]

    def _transport_pair(self) -> tuple[CipherState, CipherState]:
        if self.cipher_states is None:
            raise HandshakeError("handshake is not complete")
        return self.cipher_states

    def _tokens_for_turn(self, writing: bool) -> Sequence[str]:
        if self.complete:
            raise HandshakeError("handshake already complete")
        if self.is_my_turn() != writing:
            raise HandshakeError("handshake message out of turn")
        return self.protocol.messages[self._message_index]

    def _finish_message(self) -> None:
        self._message_index += 1
        if self._message_index == len(self.protocol.messages):
            self.cipher_states = self._symmetric.split()

    def _dh_for(self, token: str) -> bytes:
        # Spec 5.3: which local key meets which remote key for each DH token.
        local_name, remote_name = {
            "ee": ("e", "e"),
            "ss": ("s", "s"),
            "es": ("e", "s") if self.initiator else ("s", "e"),
            "se": ("s", "e") if self.initiator else ("e", "s"),
        }[token]
        local = self.e if local_name == "e" else self.s
        remote = self.re if remote_name == "e" else self.rs
        if local is None or remote is None:
            raise HandshakeError(f"key for DH token {token!r} is missing")
        return _dh(local, remote)

    def write_message(self, payload: bytes) -> bytes:
        out = bytearray()
        for token in self._tokens_for_turn(writing=True):
            if token == "e":
                if self.e is None:
                    self.e = KeyPair.generate()
                out += self.e.public
                self._symmetric.mix_hash(self.e.public)
                if self._psk is not None:
                    self._symmetric.mix_key(self.e.public)
            elif token == "s":
                if self.s is None:
                    raise HandshakeError("local static key is missing")
                out += self._symmetric.encrypt_and_hash(self.s.public)
            elif token == "psk":
                assert self._psk is not None  # checked in __init__ for psk patterns
                self._symmetric.mix_key_and_hash(self._psk)
            else:
                self._symmetric.mix_key(self._dh_for(token))
        out += self._symmetric.encrypt_and_hash(payload)
        if len(out) > MAX_NOISE_MESSAGE:
            raise HandshakeError("handshake message exceeds 65535 bytes")
        self._finish_message()
        return bytes(out)

    def read_message(self, message: bytes) -> bytes:
        if len(message) > MAX_NOISE_MESSAGE:
            raise HandshakeError("handshake message exceeds 65535 bytes")
        view = memoryview(message)
        for token in self._tokens_for_turn(writing=False):
            if token == "e":
                if len(view) < DHLEN:
                    raise HandshakeError("handshake message truncated (ephemeral key)")
                self.re = bytes(view[:DHLEN])
                view = view[DHLEN:]
                self._symmetric.mix_hash(self.re)
                if self._psk is not None:
                    self._symmetric.mix_key(self.re)
            elif token == "s":
                size = DHLEN + (TAGLEN if self._symmetric.cipher_state.has_key() else 0)
                if len(view) < size:
                    raise HandshakeError("handshake message truncated (static key)")
                self.rs = self._symmetric.decrypt_and_hash(bytes(view[:size]))
                view = view[size:]
            elif token == "psk":
                assert self._psk is not None
                self._symmetric.mix_key_and_hash(self._psk)
            else:
                self._symmetric.mix_key(self._dh_for(token))
        payload = self._symmetric.decrypt_and_hash(bytes(view))
        self._finish_message()
        return payload
