"""`dmgn add`, `query`, `get`, `delete`, `link`, `graph`, `status`, `peers`: each builds one
:mod:`dmgn.api` request (`add --jsonl` many) and prints the answer."""

from __future__ import annotations

import codecs
import sys
from pathlib import Path
from typing import cast

import click

from dmgn import api
from dmgn.app.cli_common import Options, common, emit, execute, execute_all
from dmgn.app.cli_progress import progress_bar
from dmgn.app.daemon_cli import argument_text, parse_time
from dmgn.errors import InvalidInput, NotInitialized


def read_stdin_text(encoding: str) -> str:
    """All of stdin, decoded strictly: a wrong guess is an error that names the byte, not a
    memory with replacement characters in it."""
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise InvalidInput(
            f"--encoding {encoding!r} is not an encoding Python knows; try utf-8, latin-1, "
            "cp1252 or utf-16"
        ) from None
    data = sys.stdin.buffer.read()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as error:
        byte = data[error.start]
        hint = (
            "if it is text in another encoding, name it, e.g. --encoding latin-1 (or cp1252, "
            "utf-16); a binary file cannot be a memory"
            if codecs.lookup(encoding).name == "utf-8"
            else "check the file's encoding"
        )
        raise InvalidInput(
            f"stdin is not {encoding} text: byte 0x{byte:02x} at offset {error.start} "
            f"cannot be decoded ({error.reason}); {hint}"
        ) from None


def parse_metadata(pairs: tuple[str, ...]) -> dict[str, str]:
    metadata: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidInput(f"--meta {pair!r}: use key=value")
        metadata[key] = value
    return metadata


@click.command()
@click.argument("text", required=False)
@click.option(
    "--type",
    "kind",
    default="text",
    show_default=True,
    type=click.Choice(["text", "conversation", "observation", "document"]),
)
@click.option("--link", "links", multiple=True, help="Link to this memory id (repeatable).")
@click.option("--link-type", default="related", show_default=True, help="Edge type of --link.")
@click.option("--meta", multiple=True, help="Metadata key=value (repeatable).")
@click.option(
    "--jsonl",
    type=click.Path(path_type=Path),
    default=None,
    help='Import many memories from FILE, one JSON object per line: {"content": "...", '
    '"type": "conversation", "metadata": {...}, "links": [...]} (content required).',
)
@click.option(
    "--strict",
    is_flag=True,
    help="With --jsonl: check every line first and import nothing if one is bad "
    "(default: report bad lines by number and import the rest).",
)
@click.option(
    "--encoding",
    default="utf-8",
    show_default=True,
    help="Encoding of the text read from stdin with TEXT '-' (e.g. latin-1, cp1252, utf-16).",
)
@common
def add(
    options: Options,
    text: str | None,
    kind: str,
    links: tuple[str, ...],
    link_type: str,
    meta: tuple[str, ...],
    jsonl: Path | None,
    strict: bool,
    encoding: str,
) -> None:
    """Add a memory. TEXT may be '-' to read it from stdin; --jsonl FILE adds many.

    A memory is text: valid Unicode without NUL bytes or other control characters (tabs and
    newlines are fine), at most 1 MiB as UTF-8.
    """
    if jsonl is not None:
        if text is not None or links or meta:
            raise InvalidInput(
                "--jsonl takes the memories from the file: give no TEXT, --link or --meta "
                "with it (put them in each line)"
            )
        import_jsonl(options, jsonl, strict)
        return
    if strict:
        raise InvalidInput("--strict only applies to --jsonl imports")
    if text is None:
        raise InvalidInput("give the memory's TEXT (or '-' to read stdin), or --jsonl FILE")
    content = read_stdin_text(encoding) if text == "-" else argument_text(text, "TEXT")
    request = api.AddMemory(
        content=content,
        type=cast(api.MemoryType, kind),
        links=links,
        metadata={
            argument_text(k, "--meta"): argument_text(v, "--meta")
            for k, v in parse_metadata(meta).items()
        },
        link_type=link_type,
    )
    emit(options, "add", execute(options, request))


def import_jsonl(options: Options, path: Path, strict: bool) -> None:
    from dmgn.app import bulk

    if not path.is_file():
        raise InvalidInput(f"{path} is not a file; give a JSON-lines file, one memory per line")
    total = bulk.count_lines(path)
    with progress_bar(
        options, f"importing {path.name}", "lines", total, terminal_only=False
    ) as advance:
        summary = bulk.run_import(
            path,
            lambda requests, answered: execute_all(options, requests, answered),
            strict=strict,
            progress=advance,
        )
    emit(options, "import", summary.to_json())
    if summary.failed and not summary.added:
        sys.exit(1)


@click.command()
@click.argument("text", required=False)
@click.option("--recent", is_flag=True, help="List the most recent memories (oldest first).")
@click.option("--limit", default=10, show_default=True, type=int)
@click.option(
    "--type",
    "types",
    multiple=True,
    type=click.Choice(["text", "conversation", "observation", "document"]),
    help="Only memories of this type (repeatable).",
)
@click.option("--after", help="Only memories created after this time (ISO-8601).")
@click.option("--before", help="Only memories created before this time (ISO-8601).")
@click.option("--links-of", help="Only memories linked to or from this memory id.")
@click.option(
    "--alpha",
    type=float,
    default=None,
    help="Weight of meaning vs words: 1 = meaning only, 0 = words only.",
)
@click.option("--full", "include_content", is_flag=True, help="Show whole contents.")
@common
def query(
    options: Options,
    text: str | None,
    recent: bool,
    limit: int,
    types: tuple[str, ...],
    after: str | None,
    before: str | None,
    links_of: str | None,
    alpha: float | None,
    include_content: bool,
) -> None:
    """Search memories by meaning and words, or list recent ones."""
    request = api.QueryMemories(
        text=None if text is None else argument_text(text, "TEXT"),
        limit=limit,
        types=cast(tuple[api.MemoryType, ...], types),
        after=parse_time(after),
        before=parse_time(before),
        links_of=links_of,
        alpha=alpha,
        include_content=include_content,
        recent=recent,
    )
    emit(options, "query", execute(options, request))


@click.command()
@click.argument("memory_id")
@common
def get(options: Options, memory_id: str) -> None:
    """Show one memory (full id or a unique prefix)."""
    emit(options, "get", execute(options, api.GetMemory(id=memory_id)))


@click.command()
@click.argument("memory_id")
@common
def delete(options: Options, memory_id: str) -> None:
    """Delete a memory (a tombstone: it stays deleted on every device)."""
    emit(options, "delete", execute(options, api.DeleteMemory(id=memory_id)))


@click.command()
@click.argument("from_id")
@click.argument("to_id")
@click.option("--type", "edge_type", default="related", show_default=True)
@click.option("--weight", default=1.0, show_default=True, type=float)
@common
def link(options: Options, from_id: str, to_id: str, edge_type: str, weight: float) -> None:
    """Link two memories (directed, typed, weighted)."""
    emit(
        options,
        "link",
        execute(
            options,
            api.LinkMemories(from_id=from_id, to_id=to_id, edge_type=edge_type, weight=weight),
        ),
    )


@click.command()
@click.argument("memory_id")
@click.option("--depth", default=2, show_default=True, type=int)
@common
def graph(options: Options, memory_id: str, depth: int) -> None:
    """Show the graph of links around a memory."""
    emit(options, "graph", execute(options, api.GetGraph(start_id=memory_id, max_depth=depth)))


@click.command()
@common
def status(options: Options) -> None:
    """Show identity, store and (when running) daemon status."""
    dd = options.data_dir
    if not dd.vault.exists():
        raise NotInitialized(f"no identity in {dd.root}; run `dmgn init` first")
    emit(options, "status", execute(options, api.Status()))


@click.command()
@common
def peers(options: Options) -> None:
    """Show discovered and connected peers."""
    emit(options, "peers", execute(options, api.Peers()))


#: Registered on the `dmgn` group by dmgn.app.cli.
COMMANDS: tuple[click.Command, ...] = (
    add,
    query,
    get,
    delete,
    link,
    graph,
    status,
    peers,
)
