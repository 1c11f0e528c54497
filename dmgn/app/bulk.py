"""`dmgn add --jsonl FILE`: bulk import, one memory per line.

Each line is a JSON object with the fields of ``dmgn add`` (``content`` required; ``type``,
``links``, ``metadata``, ``embedding``, ``link_type`` optional). Lines become
:class:`dmgn.api.AddMemories` requests of at most :data:`BATCH_MEMORIES` memories and
:data:`BATCH_CHARS` characters, sent one after the other to the daemon (or to a node started
in-process once for the whole file), so the node embeds them in batches and commits each batch
in one transaction.

A line that is not a valid memory is reported with its line number and the others go in; with
``strict`` the whole file is checked first and nothing is imported if a line is bad.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmgn import api
from dmgn.errors import InvalidInput

#: Memories per request: big enough for the embedder's batches, small enough to answer well
#: within the control socket's 60 s per request.
BATCH_MEMORIES = 256
#: Characters of content per request: long memories are embedded in many windows (~3k word
#: pieces/s a core), so a batch of them is cut by size, and the request stays far below the
#: control socket's 2 MiB frame.
BATCH_CHARS = 200_000
#: Lines longer than this are refused without parsing (a memory is at most 1 MiB of text).
MAX_LINE_BYTES = 2 * 1024 * 1024
#: Requests in flight to the daemon at once: while it embeds one batch it seals, stores and
#: logs the next (and this process reads the one after), instead of each waiting in turn.
PIPELINE_DEPTH = 2


@dataclass
class Problem:
    line: int
    error: str


@dataclass
class Batch:
    lines: list[int]
    request: api.AddMemories


@dataclass
class ImportSummary:
    file: str
    lines: int = 0
    added: int = 0
    already_present: int = 0
    refused_deleted: int = 0
    failed: list[Problem] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "lines": self.lines,
            "added": self.added,
            "already_present": self.already_present,
            "refused_deleted": self.refused_deleted,
            "failed": [{"line": p.line, "error": p.error} for p in self.failed],
            "seconds": round(self.seconds, 3),
            "memories_per_s": round(self.added / self.seconds, 1) if self.seconds > 0 else None,
        }


def parse_line(number: int, raw: bytes) -> api.AddMemory | None:
    """One line → a validated memory; ``None`` for a blank line; :class:`InvalidInput` naming
    the line otherwise."""
    if len(raw) > MAX_LINE_BYTES:
        raise InvalidInput(f"line {number}: {len(raw)} bytes is more than a memory can hold")
    text = raw.strip()
    if not text:
        return None
    try:
        document = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidInput(f"line {number}: not a JSON object ({error})") from None
    if not isinstance(document, dict):
        raise InvalidInput(f'line {number}: expected a JSON object like {{"content": "..."}}')
    try:
        return api.AddMemory(**document)
    except InvalidInput as error:
        raise InvalidInput(f"line {number}: {error}") from None
    except TypeError:  # non-string keys cannot reach here from JSON; be safe anyway
        raise InvalidInput(f"line {number}: field names must be strings") from None


def count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for _ in f)


def batches(path: Path, summary: ImportSummary, *, strict: bool) -> Iterator[Batch]:
    """Read ``path`` and yield requests; bad lines go to ``summary.failed`` (or raise when
    ``strict``)."""
    lines: list[int] = []
    memories: list[api.AddMemory] = []
    chars = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            summary.lines = number
            try:
                memory = parse_line(number, raw)
            except InvalidInput as error:
                if strict:
                    raise
                summary.failed.append(Problem(number, str(error)))
                continue
            if memory is None:
                continue
            size = len(memory.content)
            if memories and (len(memories) >= BATCH_MEMORIES or chars + size > BATCH_CHARS):
                yield Batch(lines, api.AddMemories(memories=tuple(memories)))
                lines, memories, chars = [], [], 0
            lines.append(number)
            memories.append(memory)
            chars += size
    if memories:
        yield Batch(lines, api.AddMemories(memories=tuple(memories)))


def check_file(path: Path) -> int:
    """Validate every line (for ``--strict``); raises on the first bad one. Returns memories."""
    summary = ImportSummary(str(path))
    return sum(len(b.request.memories) for b in batches(path, summary, strict=True))


def send_pipelined(
    send: Callable[[api.AnyRequest], api.Response],
    requests: Iterator[api.AnyRequest],
    answered: Callable[[api.Response], None],
    *,
    depth: int = PIPELINE_DEPTH,
) -> None:
    """Send ``requests`` with up to ``depth`` in flight (each ``send`` in a worker thread);
    answers go to ``answered`` in request order, in the calling thread, which also reads
    ``requests``. A failed request stops the sending: the ones already sent are waited for
    (not reported), then its error is raised."""
    from concurrent.futures import Future, ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=depth, thread_name_prefix="dmgn-import") as pool:
        inflight: deque[Future[api.Response]] = deque()
        for request in requests:
            inflight.append(pool.submit(send, request))
            if len(inflight) >= depth:
                answered(inflight.popleft().result())
        while inflight:
            answered(inflight.popleft().result())


def run_import(
    path: Path,
    send: Callable[[Iterator[api.AnyRequest], Callable[[api.Response], None]], None],
    *,
    strict: bool,
    progress: Callable[[int], None] = lambda done: None,
) -> ImportSummary:
    """Import ``path`` through ``send`` (which runs each request and hands back its response).

    ``progress`` is called with the number of lines handled so far.
    """
    if not path.is_file():
        raise InvalidInput(f"{path} is not a file; give a JSON-lines file, one memory per line")
    if strict:
        check_file(path)
    summary = ImportSummary(str(path))
    pending: list[Batch] = []
    started = time.perf_counter()

    def requests() -> Iterator[api.AnyRequest]:
        for batch in batches(path, summary, strict=strict):
            pending.append(batch)
            yield batch.request

    def answered(response: api.Response) -> None:
        batch = pending.pop(0)
        summary.added += int(response["added"])
        summary.already_present += int(response["present"])
        summary.refused_deleted += int(response["refused"])
        for problem in response["errors"]:
            line = batch.lines[int(problem["index"])]
            summary.failed.append(Problem(line, f"line {line}: {problem['error']}"))
        progress(batch.lines[-1])

    send(requests(), answered)
    summary.failed.sort(key=lambda p: p.line)
    summary.seconds = time.perf_counter() - started
    return summary
