"""The backup archive format: one encrypted, authenticated, streamable file of a node's store.

What it holds: the store's envelopes (already ciphertext), links and tombstones - everything a
fresh data dir needs, after ``dmgn import`` of the identity, to hold the same memories. Not the
vault (``dmgn export`` covers the identity) and not the search index (a cache rebuilt at start).

Layout (all lengths big-endian)::

    "DMGNBAK1"  header_len:u32  header (JSON, in clear)  chunk*  (nothing after the last chunk)
    chunk = len:u32  XChaCha20-Poly1305(key, nonce_i, plaintext_i, aad=sha256(header))

Encryption follows the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizar 2015), as age
and Tink's streaming AEAD do: ``nonce_i = prefix(15) || i:u64 || last:u8``. The counter makes a
reordered, repeated or dropped chunk fail authentication, the ``last`` flag makes a truncated
archive detectable (its final chunk is missing), and binding the header as associated data makes
an edited header (another identity id, another salt) fail too. The archive key is
``HKDF(backup key, salt)`` with a random salt per archive; the backup key is derived in the vault
from the identity seed (purpose :data:`KEY_PURPOSE`), so only the same identity can open it.

Each chunk's plaintext is msgpack ``[kind, rows]`` (kind ``memories``, ``links`` or
``tombstones``); the last chunk is ``["manifest", {...}]`` with per-kind counts and SHA-256 over
the rows in order, which the reader recomputes. :func:`verify` reads a whole archive and checks
all of it - every tag, every count, every checksum, every envelope hash - before a restore
touches anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import msgpack
import nacl.bindings as sodium
import nacl.exceptions

from dmgn.crypto import hkdf_sha256, random_bytes
from dmgn.errors import BackupRefused, InvalidInput

MAGIC = b"DMGNBAK1"
FORMAT = "dmgn-backup"
VERSION = 1
#: Vault derivation label of the backup key (see :class:`actors.vault.DeriveKey`).
KEY_PURPOSE = "backup"
KINDS = ("memories", "links", "tombstones")

#: Plaintext collected before a chunk is sealed: large enough that per-chunk overhead (20 bytes,
#: one AEAD call) is nothing, small enough that writer and reader hold little in memory.
CHUNK_TARGET = 1024 * 1024
#: Largest chunk a reader accepts. One memory is at most ~1.1 MiB sealed, so a chunk holding one
#: row is below this; a length beyond it is damage and must not make us allocate gigabytes.
MAX_CHUNK_BYTES = 8 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024
_U32 = struct.Struct(">I")
_PREFIX_BYTES = 15

Row = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Header:
    identity_id: str
    device_id: str
    created_at: int  # ns since epoch
    salt: bytes
    nonce_prefix: bytes
    raw: bytes = b""  # the header bytes as stored (what the chunks authenticate)

    def to_bytes(self) -> bytes:
        document = {
            "format": FORMAT,
            "version": VERSION,
            "identity_id": self.identity_id,
            "device_id": self.device_id,
            "created_at": self.created_at,
            "cipher": "xchacha20poly1305-stream",
            "salt": self.salt.hex(),
            "nonce_prefix": self.nonce_prefix.hex(),
        }
        return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


@dataclass
class Manifest:
    """Counts and running checksums per kind; what the last chunk carries."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    hashes: dict[str, Any] = field(default_factory=lambda: {k: hashlib.sha256() for k in KINDS})

    def add(self, kind: str, rows: list[Row]) -> None:
        digest = self.hashes[kind]
        for row in rows:
            digest.update(_pack(list(row)))
        self.counts[kind] += len(rows)

    def to_json(self) -> dict[str, Any]:
        return {
            "counts": dict(self.counts),
            "sha256": {k: self.hashes[k].hexdigest() for k in KINDS},
        }


def _pack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _archive_key(backup_key: bytes, header: Header) -> bytes:
    return hkdf_sha256(backup_key, b"dmgn backup archive v1", salt=header.salt)


def _nonce(header: Header, index: int, last: bool) -> bytes:
    return header.nonce_prefix + index.to_bytes(8, "big") + bytes([last])


class ArchiveWriter:
    """Writes an archive to ``<path>.partial`` and renames it to ``path`` when finished, so a
    file at ``path`` is always a complete archive. Not thread-safe; use from one thread."""

    def __init__(
        self, path: Path, backup_key: bytes, identity_id: str, device_id: str, created_at: int
    ) -> None:
        if path.exists():
            raise InvalidInput(f"{path} exists; choose another file name")
        if not path.parent.is_dir():
            raise InvalidInput(f"{path.parent} is not a directory; create it first")
        self.path = path
        self.partial = partial_path(path)
        self._header = Header(
            identity_id, device_id, created_at, random_bytes(32), random_bytes(_PREFIX_BYTES)
        )
        raw = self._header.to_bytes()
        self._aad = hashlib.sha256(raw).digest()
        self._key = _archive_key(backup_key, self._header)
        self._index = 0
        self._pending: list[Row] = []
        self._pending_kind = ""
        self._pending_bytes = 0
        self.manifest = Manifest()
        fd = os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._file: IO[bytes] = os.fdopen(fd, "wb")
        self._file.write(MAGIC + _U32.pack(len(raw)) + raw)
        self.bytes_written = len(MAGIC) + 4 + len(raw)

    def add(self, kind: str, rows: list[Row]) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown row kind {kind!r}")
        if kind != self._pending_kind:
            self._flush()
            self._pending_kind = kind
        self.manifest.add(kind, rows)
        for row in rows:
            self._pending.append(row)
            self._pending_bytes += sum(len(v) for v in row if isinstance(v, bytes | str)) + 32
            if self._pending_bytes >= CHUNK_TARGET:
                self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._seal(_pack([self._pending_kind, [list(r) for r in self._pending]]), last=False)
        self._pending = []
        self._pending_bytes = 0

    def _seal(self, plaintext: bytes, *, last: bool) -> None:
        nonce = _nonce(self._header, self._index, last)
        sealed = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(
            plaintext, self._aad, nonce, self._key
        )
        self._file.write(_U32.pack(len(sealed)) + sealed)
        self.bytes_written += 4 + len(sealed)
        self._index += 1

    def finish(self) -> dict[str, Any]:
        """Seal the manifest as the last chunk, sync, and move the file into place."""
        self._flush()
        manifest = self.manifest.to_json()
        self._seal(_pack(["manifest", manifest]), last=True)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        try:
            os.link(self.partial, self.path)  # never replaces a file made meanwhile
        except FileExistsError:
            self.partial.unlink()
            raise InvalidInput(
                f"{self.path} appeared while the backup was written; nothing was replaced, "
                "choose another file name"
            ) from None
        self.partial.unlink()
        _fsync_dir(self.path.parent)
        return {**manifest, "bytes": self.bytes_written, "chunks": self._index}

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.partial.unlink(missing_ok=True)


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- reading ------------------------------------------------------------------------------------


def read_header(stream: IO[bytes], source: Path) -> Header:
    """The clear header; raises :class:`BackupRefused` if this is not a dmgn backup."""
    not_ours = f"{source} is not a dmgn backup (made by `dmgn backup`)"
    if stream.read(len(MAGIC)) != MAGIC:
        raise BackupRefused(not_ours)
    length = _read_u32(stream, source)
    if length is None or not 0 < length <= MAX_HEADER_BYTES:
        raise BackupRefused(f"{not_ours}: its header is damaged")
    raw = stream.read(length)
    try:
        document = json.loads(raw)
        if document.get("format") != FORMAT or document.get("version") != VERSION:
            raise BackupRefused(
                f"{source} is a {document.get('format')!r} version {document.get('version')!r} "
                f"file; this dmgn reads {FORMAT} version {VERSION}"
            )
        header = Header(
            str(document["identity_id"]),
            str(document["device_id"]),
            int(document["created_at"]),
            bytes.fromhex(document["salt"]),
            bytes.fromhex(document["nonce_prefix"]),
            raw,
        )
    except BackupRefused:
        raise
    except (ValueError, KeyError, TypeError, AttributeError):
        raise BackupRefused(f"{not_ours}: its header is damaged") from None
    if len(header.salt) != 32 or len(header.nonce_prefix) != _PREFIX_BYTES:
        raise BackupRefused(f"{not_ours}: its header is damaged")
    return header


def _read_u32(stream: IO[bytes], source: Path) -> int | None:
    data = stream.read(4)
    if not data:
        return None
    if len(data) != 4:
        raise BackupRefused(f"{source} is truncated (it ends inside a chunk); nothing restored")
    value: int = _U32.unpack(data)[0]
    return value


def iter_archive(
    source: Path,
    backup_key: bytes,
    identity_id: str,
    *,
    progress: Callable[[int], None] | None = None,
) -> Iterator[tuple[str, list[Row]]]:
    """Yield ``(kind, rows)`` in archive order, checking as it goes; the manifest is checked
    after the last chunk (so a caller that acts on rows must first run :func:`verify`).

    Raises :class:`BackupRefused` with one sentence for a foreign, damaged or truncated archive.
    ``progress`` receives the bytes read so far.
    """
    with source.open("rb") as stream:
        header = read_header(stream, source)
        if header.identity_id != identity_id:
            raise BackupRefused(
                f"{source} is a backup of identity {header.identity_id[:16]}..., not of this "
                f"node's identity {identity_id[:16]}...; import that identity into another "
                "data dir to restore it"
            )
        aad = hashlib.sha256(header.raw).digest()
        key = _archive_key(backup_key, header)
        manifest = Manifest()
        index = 0
        offset = len(MAGIC) + 4 + len(header.raw)
        while True:
            length = _read_u32(stream, source)
            if length is None:
                raise BackupRefused(
                    f"{source} is truncated (its final chunk is missing); nothing restored"
                )
            if not 16 < length <= MAX_CHUNK_BYTES:
                raise BackupRefused(f"{source} is damaged at byte {offset}; nothing restored")
            sealed = stream.read(length)
            if len(sealed) != length:
                raise BackupRefused(
                    f"{source} is truncated (it ends inside a chunk); nothing restored"
                )
            plaintext, last = _open_chunk(sealed, aad, key, header, index, source, offset)
            offset += 4 + length
            index += 1
            if progress is not None:
                progress(offset)
            kind, body = _decode_chunk(plaintext, source, offset)
            if last:
                if kind != "manifest" or stream.read(1):
                    raise BackupRefused(f"{source} is damaged after its last chunk")
                _check_manifest(body, manifest, source)
                return
            rows = _check_rows(kind, body, source)
            manifest.add(kind, rows)
            yield kind, rows


def _open_chunk(
    sealed: bytes, aad: bytes, key: bytes, header: Header, index: int, source: Path, offset: int
) -> tuple[bytes, bool]:
    for last in (False, True):
        try:
            opened: bytes = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
                sealed, aad, _nonce(header, index, last), key
            )
        except nacl.exceptions.CryptoError:
            continue
        return opened, last
    raise BackupRefused(
        f"{source} is damaged at byte {offset} (chunk {index} fails authentication: changed "
        "bytes, or a backup made with another key); nothing restored"
    )


def _decode_chunk(plaintext: bytes, source: Path, offset: int) -> tuple[str, Any]:
    try:
        document = msgpack.unpackb(plaintext, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        raise BackupRefused(f"{source}: the chunk before byte {offset} is malformed") from None
    if not (isinstance(document, list) and len(document) == 2 and isinstance(document[0], str)):
        raise BackupRefused(f"{source}: the chunk before byte {offset} is malformed")
    kind, body = document
    if kind not in (*KINDS, "manifest"):
        raise BackupRefused(f"{source}: unknown section {kind!r}; is it from a newer dmgn?")
    return kind, body


_ROW_TYPES: dict[str, tuple[type, ...]] = {
    "memories": (str, int, str, bytes, bytes),
    "links": (str, str, str, float, int),
    "tombstones": (str, int),
}


def _check_rows(kind: str, body: Any, source: Path) -> list[Row]:
    if not isinstance(body, list):
        raise BackupRefused(f"{source}: a {kind} section is malformed")
    types = _ROW_TYPES[kind]
    rows: list[Row] = []
    for item in body:
        if not (
            isinstance(item, list)
            and len(item) == len(types)
            and all(isinstance(v, t) for v, t in zip(item, types, strict=True))
        ):
            raise BackupRefused(f"{source}: a {kind} row is malformed")
        if kind == "memories" and hashlib.sha256(item[4]).hexdigest() != item[0]:
            raise BackupRefused(
                f"{source}: memory {item[0][:12]} does not hash to its id; nothing restored"
            )
        rows.append(tuple(item))
    return rows


def _check_manifest(body: Any, seen: Manifest, source: Path) -> None:
    expected = seen.to_json()
    if body != expected:
        raise BackupRefused(
            f"{source}: its manifest does not match its contents (counts "
            f"{body.get('counts') if isinstance(body, dict) else body!r} vs "
            f"{expected['counts']}); nothing restored"
        )


def verify(
    source: Path,
    backup_key: bytes,
    identity_id: str,
    *,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Read and check the whole archive; return its manifest (counts, checksums) and header
    facts. Raises :class:`BackupRefused` on any problem. Reads only; writes nothing."""
    manifest = Manifest()
    for kind, rows in iter_archive(source, backup_key, identity_id, progress=progress):
        manifest.add(kind, rows)
    with source.open("rb") as stream:
        header = read_header(stream, source)
    return {
        **manifest.to_json(),
        "identity_id": header.identity_id,
        "device_id": header.device_id,
        "created_at": header.created_at,
        "bytes": source.stat().st_size,
    }
