"""The memory model and its envelope: what is stored, synced and sharded.

A memory (content, type, metadata, optional embedding, created_at) is plaintext only inside the
vault actor and in the indexer's RAM. Everywhere else it travels as an *envelope*:

    header  = [version, author identity pubkey, device id, created_at ns, type]
    wrapped = XChaCha20-Poly1305(master key, K, aad=header)      K: random per memory
    payload = XChaCha20-Poly1305(K, msgpack(body), aad=header)
    sig     = ed25519(identity, "dmgn-envelope-v1" || msgpack([header, wrapped, payload]))
    envelope bytes = msgpack([header, wrapped, payload, sig]);  id = sha256(envelope bytes) hex

Time and type stay in clear because the store filters on them without keys; the header is bound
into both AEADs and the signature, so a store (or a stranger) cannot re-date or re-type a memory.
The id is content-addressed like the reference, so any change to any byte changes the id - which
is how a tampered envelope is caught on read even before its signature is checked.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Any

import msgpack
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from dmgn.crypto import DecryptionFailed, random_bytes, seal, unseal
from dmgn.errors import InvalidInput, TamperedEnvelope

MEMORY_TYPES = ("text", "conversation", "observation", "document")
ENVELOPE_VERSION = 1
_SIGNATURE_CONTEXT = b"dmgn-envelope-v1"

#: Limits on what one memory may carry. 1 MiB of content is a long document chunk; anything
#: bigger should be split (and would not fit a sync message comfortably).
MAX_CONTENT_BYTES = 1 << 20
MAX_METADATA_ENTRIES = 64
MAX_METADATA_KEY = 128
MAX_METADATA_VALUE = 4096
MAX_EMBEDDING_DIM = 4096
MAX_ENVELOPE_BYTES = MAX_CONTENT_BYTES + 64 * 1024 + 4 * MAX_EMBEDDING_DIM


@dataclass(frozen=True, slots=True)
class Memory:
    content: str
    type: str
    created_at: int  # nanoseconds since the epoch
    metadata: dict[str, str] = field(default_factory=dict)
    embedding: tuple[float, ...] | None = None


@dataclass(frozen=True, slots=True)
class EnvelopeHeader:
    """What anyone can read from an envelope, after its signature has been checked."""

    id: str
    author: bytes
    device: bytes
    created_at: int
    type: str


#: Control characters a memory may not contain: C0 controls other than the whitespace ones
#: (tab, newline, vertical tab, form feed, carriage return), and DEL. A memory is text for
#: people and models to read; NUL bytes and other controls mean binary data (an image, an
#: archive, a file read with the wrong tool), which no search or model can use.
_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f]")
#: Unpaired surrogates: not text at all, and not encodable as UTF-8. Python makes them from
#: command-line bytes that are not UTF-8 (surrogateescape); JSON can carry them as escapes.
_SURROGATE = re.compile("[\ud800-\udfff]")


def not_text(value: str) -> str | None:
    """Why ``value`` is not text that can be stored or sent (UTF-8), or ``None`` if it is.

    The one check every door uses for every string it takes (content, metadata keys and
    values, query text, ids, link types): Python holds lone UTF-16 surrogates in a ``str``
    (from JSON ``"\\udc00"`` escapes, or command-line bytes that were not UTF-8), and msgpack,
    JSON encoders and sockets all refuse them later, far from the request. The sentence does
    not echo the value (it could not be printed either).
    """
    surrogate = _SURROGATE.search(value)
    if surrogate is None:
        return None
    return (
        f"is not valid text: U+{ord(surrogate.group()):04X} at character {surrogate.start()} "
        "is half of a UTF-16 pair (bytes that were not UTF-8?); give the text in UTF-8"
    )


def check_content(content: str) -> str:
    """What content a memory may have, checked the same way on every path (CLI, control
    socket, MCP): non-blank text, valid Unicode, no control characters but whitespace, at most
    :data:`MAX_CONTENT_BYTES` of UTF-8. Returns ``content``; raises :class:`InvalidInput` with
    the one sentence each path shows."""
    if not content.strip():
        raise InvalidInput("a memory needs some content; got an empty string")
    problem = not_text(content)
    if problem is not None:
        raise InvalidInput(f"content {problem}")
    control = _CONTROL.search(content)
    if control is not None:
        raise InvalidInput(
            f"content contains the control character U+{ord(control.group()):04X} at character "
            f"{control.start()}; a memory is text (binary data and NUL bytes are refused) - "
            "store the text of a file, or a description and its path, instead"
        )
    size = len(content.encode())
    if size > MAX_CONTENT_BYTES:
        raise InvalidInput(
            f"content is {size} bytes of UTF-8; the limit is {MAX_CONTENT_BYTES} bytes (1 MiB) "
            "- split long documents into several memories"
        )
    return content


def validate_memory(memory: Memory) -> None:
    """Reject bad input with a sentence the caller can act on."""
    if memory.type not in MEMORY_TYPES:
        raise InvalidInput(
            f"unknown memory type {memory.type!r}; use one of {', '.join(MEMORY_TYPES)}"
        )
    check_content(memory.content)
    if len(memory.metadata) > MAX_METADATA_ENTRIES:
        raise InvalidInput(f"at most {MAX_METADATA_ENTRIES} metadata entries are allowed")
    for key, value in memory.metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidInput("metadata keys and values must be strings")
        # Checked here too, not only at the doors: msgpack would raise inside the vault.
        problem = not_text(key)
        if problem is not None:
            raise InvalidInput(f"a metadata key {problem}")
        problem = not_text(value)
        if problem is not None:
            raise InvalidInput(f"metadata value of {key!r} {problem}")
        if not key or len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
            raise InvalidInput(
                f"metadata key {key[:40]!r}: keys need 1-{MAX_METADATA_KEY} characters, values "
                f"at most {MAX_METADATA_VALUE}"
            )
    if memory.embedding is not None:
        if not 1 <= len(memory.embedding) <= MAX_EMBEDDING_DIM:
            raise InvalidInput(f"an embedding needs 1-{MAX_EMBEDDING_DIM} dimensions")
        if not all(isinstance(x, int | float) and math.isfinite(x) for x in memory.embedding):
            raise InvalidInput("an embedding must be a list of finite numbers")


def memory_id(envelope: bytes) -> str:
    return hashlib.sha256(envelope).hexdigest()


def seal_memory(
    memory: Memory, *, signing_key: SigningKey, master_key: bytes, device_id: bytes
) -> tuple[str, bytes]:
    """Encrypt and sign a memory; returns ``(id, envelope bytes)``."""
    validate_memory(memory)
    header = [
        ENVELOPE_VERSION,
        bytes(signing_key.verify_key),
        device_id,
        memory.created_at,
        memory.type,
    ]
    aad = _pack(header)
    key = random_bytes(32)
    body: dict[str, Any] = {"c": memory.content, "m": memory.metadata}
    if memory.embedding is not None:
        body["e"] = [float(x) for x in memory.embedding]
    try:
        packed = _pack(body)
    except (ValueError, TypeError) as error:
        # validate_memory admits only what msgpack packs; if a new field slips past it, the
        # caller gets a refusal instead of the vault crashing on its request.
        raise InvalidInput(f"the memory cannot be encoded ({type(error).__name__})") from None
    payload = seal(key, packed, aad)
    wrapped = seal(master_key, key, aad)
    signature = signing_key.sign(_signed_bytes(header, wrapped, payload)).signature
    envelope = _pack([header, wrapped, payload, signature])
    return memory_id(envelope), envelope


def read_header(envelope: bytes, *, expected_id: str | None = None) -> EnvelopeHeader:
    """Parse and verify an envelope without any secret: structure, id and signature."""
    if expected_id is not None and memory_id(envelope) != expected_id:
        raise TamperedEnvelope(
            f"memory {expected_id[:12]}: stored bytes do not hash to its id (tampered or "
            "corrupted); it was not returned"
        )
    header, wrapped, payload, signature = _parts(envelope)
    _version, author, device, created_at, kind = header
    try:
        VerifyKey(author).verify(_signed_bytes(header, wrapped, payload), signature)
    except (BadSignatureError, ValueError, TypeError):
        raise TamperedEnvelope(
            f"memory {memory_id(envelope)[:12]}: signature does not verify (tampered or forged)"
        ) from None
    return EnvelopeHeader(memory_id(envelope), author, device, created_at, kind)


def open_memory(
    envelope: bytes, *, master_key: bytes, expected_author: bytes, expected_id: str | None = None
) -> tuple[EnvelopeHeader, Memory]:
    """Verify and decrypt an envelope written by ``expected_author``."""
    head = read_header(envelope, expected_id=expected_id)
    if head.author != expected_author:
        raise TamperedEnvelope(f"memory {head.id[:12]} was written by another identity")
    header, wrapped, payload, _ = _parts(envelope)
    aad = _pack(header)
    try:
        key = unseal(master_key, wrapped, aad)
        body = msgpack.unpackb(unseal(key, payload, aad), raw=False)
        content, metadata = body["c"], body["m"]
        embedding = body.get("e")
        if not isinstance(content, str) or not isinstance(metadata, dict):
            raise TypeError("bad body")
    except (DecryptionFailed, ValueError, KeyError, TypeError, msgpack.UnpackException):
        raise TamperedEnvelope(
            f"memory {head.id[:12]} could not be decrypted (tampered, or sealed by another key)"
        ) from None
    memory = Memory(
        content,
        head.type,
        head.created_at,
        dict(metadata),
        tuple(embedding) if embedding is not None else None,
    )
    return head, memory


def _parts(envelope: bytes) -> tuple[list[Any], bytes, bytes, bytes]:
    malformed = TamperedEnvelope(
        f"memory {memory_id(envelope)[:12]}: envelope is malformed (tampered or corrupted)"
    )
    if len(envelope) > MAX_ENVELOPE_BYTES:
        raise malformed
    try:
        header, wrapped, payload, signature = msgpack.unpackb(
            envelope, raw=False, strict_map_key=True
        )
        version, author, device, created_at, kind = header
    except (ValueError, TypeError, msgpack.UnpackException):
        raise malformed from None
    if not (
        version == ENVELOPE_VERSION
        and isinstance(author, bytes)
        and len(author) == 32
        and isinstance(device, bytes)
        and len(device) == 16
        and isinstance(created_at, int)
        and kind in MEMORY_TYPES
        and isinstance(wrapped, bytes)
        and isinstance(payload, bytes)
        and isinstance(signature, bytes)
        and len(signature) == 64
    ):
        raise malformed
    return header, wrapped, payload, signature


def _signed_bytes(header: list[Any], wrapped: bytes, payload: bytes) -> bytes:
    return _SIGNATURE_CONTEXT + _pack([header, wrapped, payload])


def _pack(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed
