"""Gossip's durable feed log: every device feed of our identity, append-only, in one file.

Records are length- and CRC-framed, so a torn write at a crash is detected and cut off at load;
the store's DuckDB file is not used, because the log must be appended with one fsync per group
of entries and read back in feed order.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import zlib
from array import array
from collections.abc import Sequence
from pathlib import Path

from dmgn.errors import DiskFull, DmgnError
from dmgn.feed import (
    FeedEntry,
    FeedError,
    FeedHead,
    check_continuity,
    decode_entry,
)

log = logging.getLogger("dmgn.gossip")


# -- the durable log ----------------------------------------------------------------------------


class FeedLogWriteFailed(DmgnError):
    """The feed log could not be written for a reason other than a full disk (an I/O error)."""

    code = "io_error"


_RECORD_HEADER = struct.Struct(">II")  # length, crc32 of the entry bytes


class FeedLog:
    """Append-only log of feed entries: ``[u32 length][u32 crc32][entry bytes]`` records.

    ``path=None`` keeps the same records in memory (sims and tests; the object can be handed to
    a restarted actor to model a node's disk). Appends are synced before they return. A torn
    record at the end (a crash mid-append) is cut off on load; the entries in it are fetched again
    from peers.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._memory = bytearray()
        self._fd: int | None = None
        self._size = 0

    def load(self) -> list[tuple[FeedEntry, int]]:
        """Open the log and return its entries with their offsets (blocking)."""
        data = self._read_all()
        entries: list[tuple[FeedEntry, int]] = []
        heads: dict[bytes, FeedHead] = {}
        offset = 0
        while offset < len(data):
            start = offset
            try:
                if offset + _RECORD_HEADER.size > len(data):
                    raise FeedError("truncated record header")
                length, crc = _RECORD_HEADER.unpack_from(data, offset)
                offset += _RECORD_HEADER.size
                body = bytes(data[offset : offset + length])
                if len(body) != length or zlib.crc32(body) != crc:
                    raise FeedError("truncated or corrupted record")
                entry = decode_entry(body)
                check_continuity(heads.get(entry.device_id), entry)
            except FeedError as error:
                log.warning(
                    "feed log %s: %s at byte %d; dropping the rest (%d bytes), it will "
                    "be fetched again from peers",
                    self.path or "(memory)",
                    error,
                    start,
                    len(data) - start,
                )
                self._truncate(start)
                break
            heads[entry.device_id] = entry.head
            entries.append((entry, start + _RECORD_HEADER.size))
            offset += length
        else:
            self._truncate(len(data))
        return entries

    def _read_all(self) -> bytes | bytearray:
        if self.path is None:
            return self._memory
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        with open(self._fd, "rb", closefd=False) as file:
            return file.read()

    def _truncate(self, size: int) -> None:
        if self.path is None:
            del self._memory[size:]
        else:
            assert self._fd is not None
            os.ftruncate(self._fd, size)
            os.fsync(self._fd)
        self._size = size

    def append(self, entries: Sequence[FeedEntry]) -> list[int]:
        """Append and sync; returns each entry's offset (blocking).

        All or nothing: if the write or the sync fails (a full disk), the log is cut back to
        where it was and :class:`DiskFull` (or :class:`FeedLogWriteFailed`) is raised; none of
        ``entries`` is in the log, and the next append writes at the same place.
        """
        chunks, offsets = [], []
        position = self._size
        for entry in entries:
            chunks.append(_RECORD_HEADER.pack(len(entry.encoded), zlib.crc32(entry.encoded)))
            chunks.append(entry.encoded)
            offsets.append(position + _RECORD_HEADER.size)
            position += _RECORD_HEADER.size + len(entry.encoded)
        blob = b"".join(chunks)
        if self.path is None:
            self._memory += blob
        else:
            try:
                self._write_at_end(blob)
            except OSError as error:
                self._cut_back()
                if error.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise DiskFull(
                        f"the disk holding the sync feed ({self.path}) is full: the change was "
                        "not logged for your devices; free some space and try again"
                    ) from None
                raise FeedLogWriteFailed(
                    f"could not write the sync feed {self.path}: {error.strerror}; the change "
                    "was not logged for your devices"
                ) from None
        self._size = position
        return offsets

    def _write_at_end(self, blob: bytes) -> None:
        assert self._fd is not None
        view = memoryview(blob)
        while view:  # pwrite may write less than asked (a disk filling up mid-write)
            written = os.pwrite(self._fd, view, self._size + len(blob) - len(view))
            view = view[written:]
        os.fsync(self._fd)

    def _cut_back(self) -> None:
        """Drop what a failed append left past the last whole record (shrinking a file needs
        no space). Best effort: a torn tail that stays is cut off at the next load anyway."""
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, self._size)
        except OSError as error:
            log.warning("feed log %s: could not cut back a failed append: %s", self.path, error)

    def read(self, spans: Sequence[tuple[int, int]]) -> list[bytes]:
        """Entry bytes at ``(offset, length)`` spans (blocking)."""
        if self.path is None:
            return [bytes(self._memory[o : o + n]) for o, n in spans]
        assert self._fd is not None
        return [os.pread(self._fd, n, o) for o, n in spans]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def blocking(self) -> bool:
        """Whether calls touch the disk (and so belong in a worker thread)."""
        return self.path is not None


class _Feed:
    """Where one device's entries are in the log, compactly (a lifetime has many entries)."""

    __slots__ = ("hashes", "lengths", "offsets")

    def __init__(self) -> None:
        self.offsets = array("Q")
        self.lengths = array("I")
        self.hashes = bytearray()

    @property
    def seq(self) -> int:
        return len(self.offsets)

    def hash_at(self, seq: int) -> bytes:
        return bytes(self.hashes[(seq - 1) * 32 : seq * 32])

    def head(self, device_id: bytes) -> FeedHead | None:
        return FeedHead(device_id, self.seq, self.hash_at(self.seq)) if self.seq else None

    def add(self, entry: FeedEntry, offset: int) -> None:
        self.offsets.append(offset)
        self.lengths.append(len(entry.encoded))
        self.hashes += entry.hash

    def spans(self, first: int, last: int) -> list[tuple[int, int]]:
        return [(self.offsets[i], self.lengths[i]) for i in range(first - 1, last)]
