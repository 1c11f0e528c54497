"""`dmgn`: the control CLI.

Every memory command builds a :mod:`dmgn.api` request. If a daemon runs for the data dir, the
request goes through its control socket; otherwise the CLI unlocks the vault, starts the needed
actors in-process, runs the request and stops them. Both paths print the same thing.

Errors are one line on stderr and a non-zero exit code (see :mod:`dmgn.errors`).

The `dmgn` console script starts in :mod:`dmgn.app.daemon_cli`, which answers the read-only
commands a running daemon serves (status, peers, get, query) before anything here is imported;
``python -m dmgn.app.cli`` does the same just below.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    # Before the imports below (click, pydantic, rich): a command the running daemon answers
    # costs little more than starting Python (issue 17). E402 is off for this file for it.
    from dmgn.app.daemon_cli import answer_through_daemon

    if (_code := answer_through_daemon(sys.argv[1:])) is not None:
        sys.exit(_code)

import codecs
import contextlib
import functools
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import click

from dmgn import __version__, api
from dmgn.api_token import create_token, read_token
from dmgn.app import daemon
from dmgn.app.control_client import daemon_request, run_offline_or_via_daemon
from dmgn.app.daemon_cli import argument_text, parse_time
from dmgn.app.unlock import read_passphrase, unlock
from dmgn.backup import partial_path
from dmgn.config import Config, load_config, save_config
from dmgn.errors import (
    AlreadyInitialized,
    DaemonOwnsDataDir,
    DaemonUnavailable,
    DmgnError,
    InvalidInput,
    NotInitialized,
)
from dmgn.identity import (
    EXPORT_FORMAT,
    check_passphrase,
    decrypt_seed,
    encrypt_seed,
    identity_id,
    load_or_create_device_id,
    new_seed,
    write_vault,
)
from dmgn.paths import DataDir, default_data_dir, write_private

F = TypeVar("F", bound=Callable[..., Any])


class Options:
    """Options every command accepts, wherever they appear on the command line."""

    def __init__(self, data_dir: Path | None, as_json: bool, passphrase_file: Path | None) -> None:
        self.data_dir = DataDir((data_dir or default_data_dir()).expanduser().absolute())
        self.as_json = as_json
        self.passphrase_file = passphrase_file


def common(func: F) -> F:
    """Add --data-dir, --json and --passphrase-file to a command; turn errors into one line."""

    @click.option(
        "--data-dir",
        type=click.Path(path_type=Path),
        default=None,
        envvar="DMGN_DATA_DIR",
        help="Data directory (default: platform config dir, "
        "e.g. ~/.config/dmgn; env DMGN_DATA_DIR).",
    )
    @click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
    @click.option(
        "--passphrase-file",
        type=click.Path(path_type=Path),
        default=None,
        help="Read the passphrase from the first line of FILE (for scripts; "
        "env DMGN_PASSPHRASE also works).",
    )
    @functools.wraps(func)
    def wrapper(
        data_dir: Path | None, as_json: bool, passphrase_file: Path | None, **kwargs: Any
    ) -> None:
        options = Options(data_dir, as_json, passphrase_file)
        try:
            func(options, **kwargs)
        except DmgnError as error:
            fail(options, str(error), error.code, error.exit_code)
        except KeyboardInterrupt:
            fail(options, "interrupted", "interrupted", 130)
        except Exception as error:  # a bug: one line for people, the trace on request
            if os.environ.get("DMGN_DEBUG"):
                raise
            fail(
                options,
                f"internal error: {type(error).__name__}: {error} (set DMGN_DEBUG=1 "
                "for a traceback, and please report it)",
                "internal",
                70,
            )

    return wrapper  # type: ignore[return-value]


def fail(options: Options, message: str, code: str, exit_code: int) -> None:
    if options.as_json:
        click.echo(json.dumps({"error": message, "code": code}), err=True)
    else:
        click.echo(f"dmgn: {message}", err=True)
    sys.exit(exit_code)


def console(*, stderr: bool = False) -> Any:
    """A rich Console (imported on use: commands printing JSON never load rich)."""
    from rich.console import Console

    return Console(stderr=stderr)


def emit(options: Options, command: str, response: dict[str, Any]) -> None:
    if options.as_json:
        click.echo(json.dumps(response, indent=2, ensure_ascii=False))
    elif command == "status":
        from dmgn.app.render_plain import render_status  # as through the daemon: no rich

        render_status(response)
    else:
        from dmgn.app.render import render  # rich: only people's output pays for it

        render(console(), command, response)


def execute(options: Options, request: api.AnyRequest) -> dict[str, Any]:
    """Run a request through the daemon if one runs, else in-process.

    Offline, the command holds the data dir lock while it works, so a daemon started meanwhile
    refuses to start rather than sharing the store with it.
    """
    response = daemon_request(options.data_dir, request)
    if response is not None:
        return response
    load_config(options.data_dir.config)  # a broken config is reported before any work
    seed, device_id = unlock(options.data_dir, read_passphrase(options.passphrase_file))
    # Imported here: the actors (trio, DuckDB) cost half a second that commands going through
    # the daemon should not pay.
    import trio

    from actors.node import embedder_from_environment, open_node

    async def offline() -> dict[str, Any]:
        # The model loads only if this command embeds something (status, get and
        # query --recent do not).
        embedder = embedder_from_environment(lazy=True)
        async with open_node(seed, device_id, options.data_dir.root, embedder=embedder) as node:
            return await node.request(request)

    # Someone may have taken the data dir while we unlocked (a daemon, another command): it
    # waits for them, then asks the daemon or takes its turn.
    return run_offline_or_via_daemon(options.data_dir, request, lambda: trio.run(offline))


def execute_all(
    options: Options,
    requests: Iterator[api.AnyRequest],
    answered: Callable[[api.Response], None],
) -> None:
    """Run many requests in order, through the daemon if one runs, else in one in-process node
    (unlocked and started once, not per request)."""
    first = next(requests, None)
    if first is None:
        return
    response = daemon_request(options.data_dir, first)
    if response is not None:
        answered(response)

        def send(request: api.AnyRequest) -> api.Response:
            response = daemon_request(options.data_dir, request)
            if response is None:
                raise DaemonUnavailable(
                    "the daemon stopped in the middle; what was reported before this was "
                    "stored, the rest may not be"
                )
            return response

        from dmgn.app.bulk import send_pipelined

        send_pipelined(send, requests, answered)
        return
    load_config(options.data_dir.config)
    seed, device_id = unlock(options.data_dir, read_passphrase(options.passphrase_file))
    import trio

    from actors.node import embedder_from_environment, open_node

    async def offline() -> None:
        # The model loads only if this command embeds something (status, get and
        # query --recent do not).
        embedder = embedder_from_environment(lazy=True)
        async with open_node(seed, device_id, options.data_dir.root, embedder=embedder) as node:
            answered(await node.request(first, timeout=600))
            for request in requests:
                answered(await node.request(request, timeout=600))

    with daemon.offline_access(options.data_dir):
        trio.run(offline)


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dmgn")
def main() -> None:
    """dmgn - an encrypted, decentralized, lifetime memory for AI agents.

    Start with `dmgn init`, add memories with `dmgn add`, search with `dmgn query`.
    Run `dmgn start` for the daemon (sync, MCP); AI tools connect with `dmgn mcp`.
    """
    os.umask(0o077)  # every file a node writes is private to its user


# -- identity ----------------------------------------------------------------------------------


@main.command()
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing identity (its memories become unreadable unless you exported it).",
)
@common
def init(options: Options, force: bool) -> None:
    """Create a new identity (ed25519) protected by a passphrase."""
    dd = options.data_dir
    if dd.vault.exists() and not force:
        raise AlreadyInitialized(
            f"an identity already exists in {dd.root}; use --force to replace it (export it "
            "first with `dmgn export`) or choose another --data-dir"
        )
    passphrase = read_passphrase(
        options.passphrase_file, prompt="New passphrase (min 8 chars): ", confirm=True
    )
    seed = new_seed()
    data = encrypt_seed(seed, passphrase)
    dd.ensure()
    config = load_config(dd.config)
    with daemon.offline_access(dd, before="replacing the identity"):
        write_vault(dd.vault, data)
        device = load_or_create_device_id(dd.device)
    if not dd.config.exists():
        save_config(dd.config, config, dd.root)
    create_token(dd.api_token)
    emit(
        options,
        "init",
        {
            "identity_id": identity_id(seed),
            "device_id": device.hex(),
            "data_dir": str(dd.root),
            "vault": str(dd.vault),
            "api_token_file": str(dd.api_token),
        },
    )


SHARE_PASSPHRASE_ENV = "DMGN_SHARE_PASSPHRASE"


def share_passphrase_options(func: F) -> F:
    """--share-passphrase / --share-passphrase-file: the optional SLIP-39 passphrase."""
    func = click.option(
        "--share-passphrase-file",
        type=click.Path(path_type=Path),
        default=None,
        help=f"Read the share passphrase from FILE (env {SHARE_PASSPHRASE_ENV} also works).",
    )(func)
    return click.option(
        "--share-passphrase",
        "use_share_passphrase",
        is_flag=True,
        help="Shares locked with an extra SLIP-39 passphrase (asked for). A wrong one gives "
        "another identity without error, so note the identity id.",
    )(func)


def read_share_passphrase(use: bool, passphrase_file: Path | None, *, confirm: bool) -> str:
    if not use and passphrase_file is None:
        return ""
    passphrase = read_passphrase(
        passphrase_file, prompt="Share passphrase: ", confirm=confirm, env=SHARE_PASSPHRASE_ENV
    )
    from dmgn.recovery import check_share_passphrase

    check_share_passphrase(passphrase)
    return passphrase


@main.command("export")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="File to write the encrypted identity backup to; with --shares, a directory to "
    "write one 0600 file per share to.",
)
@click.option(
    "--shares",
    "share_spec",
    metavar="SPEC",
    default=None,
    help='Split the identity into SLIP-39 shares for people you trust: "3-of-5", or groups '
    '"2-of-3 family, 1 of lawyer" (all needed) or "2 groups: 2-of-3 family, 1 of lawyer, '
    '1 of safe". Printed once, or written to -o DIR. See docs/recovery.md.',
)
@share_passphrase_options
@click.option(
    "--force",
    is_flag=True,
    help="With --shares and no -o: print the shares even though stdout is not a terminal.",
)
@common
def export_identity(
    options: Options,
    output: Path | None,
    share_spec: str | None,
    use_share_passphrase: bool,
    share_passphrase_file: Path | None,
    force: bool,
) -> None:
    """Export the identity: an encrypted backup file (same passphrase), or SLIP-39 shares."""
    if share_spec is not None:
        export_shares(
            options, share_spec, output, use_share_passphrase, share_passphrase_file, force
        )
        return
    if output is None:
        raise InvalidInput("say where to write the backup: -o FILE (or split it with --shares)")
    passphrase = read_passphrase(options.passphrase_file)
    seed, _ = unlock(options.data_dir, passphrase)
    if output.exists():
        raise InvalidInput(f"{output} exists; choose another file name")
    write_private(output, encrypt_seed(seed, passphrase, fmt=EXPORT_FORMAT))
    emit(options, "export", {"identity_id": identity_id(seed), "file": str(output)})


def export_shares(
    options: Options,
    spec: str,
    directory: Path | None,
    use_share_passphrase: bool,
    share_passphrase_file: Path | None,
    force: bool,
) -> None:
    # Imported here, as in the import command: only --shares needs SLIP-39.
    from dmgn.app.share_io import print_shares, write_share_files
    from dmgn.recovery import parse_scheme, split_seed

    scheme = parse_scheme(spec)
    if directory is None and not force and not sys.stdout.isatty():
        raise InvalidInput(
            "refusing to print identity shares to something that is not a terminal (a file "
            "or a pipe keeps them); use -o DIR for one file per share, or --force"
        )
    seed, _ = unlock(options.data_dir, read_passphrase(options.passphrase_file))
    share_passphrase = read_share_passphrase(
        use_share_passphrase, share_passphrase_file, confirm=True
    )
    shares = split_seed(seed, scheme, share_passphrase)
    summary: dict[str, Any] = {
        "identity_id": identity_id(seed),
        "scheme": scheme.describe(),
        "groups_needed": scheme.groups_needed,
        "groups": [
            {"name": g.name, "threshold": g.threshold, "count": g.count} for g in scheme.groups
        ],
        "share_passphrase": bool(share_passphrase),
    }
    if directory is not None:
        files = write_share_files(directory, scheme, shares)
        summary["directory"] = str(directory)
        summary["files"] = [
            {
                "file": str(path),
                "group": share.group.name,
                "group_number": share.group_number,
                "member_number": share.member_number,
            }
            for path, share in zip(files, shares, strict=True)
        ]
        if options.as_json:
            emit(options, "export", summary)
            return
        click.echo(f"Identity {summary['identity_id']}: {scheme.describe()} restore it.")
        for path, share in zip(files, shares, strict=True):
            click.echo(f"  {path}  ({share.label})")
        click.echo("Give each file to one person (and delete it here once handed over).")
        return
    if options.as_json:
        summary["shares"] = [
            {
                "group": share.group.name,
                "group_number": share.group_number,
                "member_number": share.member_number,
                "mnemonic": share.mnemonic,
            }
            for share in shares
        ]
        emit(options, "export", summary)
        return
    print_shares(summary["identity_id"], scheme, shares)


@main.command("import")
@click.option(
    "-i",
    "--input",
    "source",
    type=click.Path(path_type=Path, exists=False),
    default=None,
    help="An identity backup made by `dmgn export`.",
)
@click.option(
    "--shares",
    "from_shares",
    is_flag=True,
    help="Restore from SLIP-39 shares: read from the FILEs written by `dmgn export --shares "
    "-o DIR`, else typed one at a time (or piped, one per line, on stdin).",
)
@click.argument("share_files", nargs=-1, type=click.Path(path_type=Path), metavar="[FILE]...")
@share_passphrase_options
@click.option("--force", is_flag=True, help="Replace an existing identity in the data dir.")
@common
def import_identity(
    options: Options,
    source: Path | None,
    from_shares: bool,
    share_files: tuple[Path, ...],
    use_share_passphrase: bool,
    share_passphrase_file: Path | None,
    force: bool,
) -> None:
    """Import an identity from a backup (e.g. to set up a second device) or from shares."""
    dd = options.data_dir
    if (source is None) == (not from_shares):
        raise InvalidInput("say what to import from: -i FILE (a backup) or --shares [FILE]...")
    if share_files and not from_shares:
        raise InvalidInput("share files are read with --shares: dmgn import --shares FILE...")
    if source is not None and not source.exists():
        raise InvalidInput(f"{source} does not exist")
    if dd.vault.exists() and not force:
        raise AlreadyInitialized(
            f"an identity already exists in {dd.root}; use --force to replace it"
        )
    extra: dict[str, Any] = {}
    if source is not None:
        passphrase = read_passphrase(options.passphrase_file, prompt="Backup passphrase: ")
        seed = decrypt_seed(source.read_bytes(), passphrase, source=source, fmt=EXPORT_FORMAT)
    else:
        from dmgn.app.share_io import recover_from_files, recover_from_stdin

        recovery, used = recover_from_files(share_files) if share_files else recover_from_stdin()
        seed = recovery.seed(
            read_share_passphrase(use_share_passphrase, share_passphrase_file, confirm=False)
        )
        passphrase = read_passphrase(
            options.passphrase_file,
            prompt="New passphrase for this device's vault (min 8 chars): ",
            confirm=True,
        )
        check_passphrase(passphrase)
        extra = {"shares_used": used}
    dd.ensure()
    config = load_config(dd.config)
    with daemon.offline_access(dd, before="replacing the identity"):
        write_vault(dd.vault, encrypt_seed(seed, passphrase))
        device = load_or_create_device_id(dd.device)
    if not dd.config.exists():
        save_config(dd.config, config, dd.root)
    emit(
        options,
        "import-identity",  # not "import": that renderer is `dmgn add --jsonl`'s summary
        {
            "identity_id": identity_id(seed),
            "device_id": device.hex(),
            "data_dir": str(dd.root),
            **extra,
        },
    )


@main.command()
@click.option(
    "--new-passphrase-file",
    type=click.Path(path_type=Path),
    default=None,
    help="Read the new passphrase from FILE (env DMGN_NEW_PASSPHRASE also works).",
)
@common
def passwd(options: Options, new_passphrase_file: Path | None) -> None:
    """Change the vault passphrase."""
    dd = options.data_dir
    seed, _ = unlock(dd, read_passphrase(options.passphrase_file, prompt="Current passphrase: "))
    new = read_passphrase(
        new_passphrase_file, prompt="New passphrase: ", confirm=True, env="DMGN_NEW_PASSPHRASE"
    )
    write_vault(dd.vault, encrypt_seed(seed, new))
    emit(options, "passwd", {"identity_id": identity_id(seed), "changed": True})


# -- memories ----------------------------------------------------------------------------------


@main.command()
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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from dmgn.app import bulk

    if not path.is_file():
        raise InvalidInput(f"{path} is not a file; give a JSON-lines file, one memory per line")
    total = bulk.count_lines(path)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console(stderr=True),
        disable=options.as_json,
        transient=True,
    ) as bar:
        task = bar.add_task(f"importing {path.name}", total=total)
        summary = bulk.run_import(
            path,
            lambda requests, answered: execute_all(options, requests, answered),
            strict=strict,
            progress=lambda line: bar.update(task, completed=line),
        )
    emit(options, "import", summary.to_json())
    if summary.failed and not summary.added:
        sys.exit(1)


@main.command()
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


@main.command()
@click.argument("memory_id")
@common
def get(options: Options, memory_id: str) -> None:
    """Show one memory (full id or a unique prefix)."""
    emit(options, "get", execute(options, api.GetMemory(id=memory_id)))


@main.command()
@click.argument("memory_id")
@common
def delete(options: Options, memory_id: str) -> None:
    """Delete a memory (a tombstone: it stays deleted on every device)."""
    emit(options, "delete", execute(options, api.DeleteMemory(id=memory_id)))


@main.command()
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


@main.command()
@click.argument("memory_id")
@click.option("--depth", default=2, show_default=True, type=int)
@common
def graph(options: Options, memory_id: str, depth: int) -> None:
    """Show the graph of links around a memory."""
    emit(options, "graph", execute(options, api.GetGraph(start_id=memory_id, max_depth=depth)))


@main.command()
@common
def status(options: Options) -> None:
    """Show identity, store and (when running) daemon status."""
    dd = options.data_dir
    if not dd.vault.exists():
        raise NotInitialized(f"no identity in {dd.root}; run `dmgn init` first")
    emit(options, "status", execute(options, api.Status()))


@main.command()
@common
def peers(options: Options) -> None:
    """Show discovered and connected peers."""
    emit(options, "peers", execute(options, api.Peers()))


# -- the daemon --------------------------------------------------------------------------------


@main.command()
@click.option(
    "--foreground",
    is_flag=True,
    help="Run the daemon in this terminal (logs on "
    "stderr, Ctrl-C stops it) instead of in the background.",
)
@click.option(
    "--timeout",
    type=float,
    default=daemon.START_TIMEOUT,
    show_default=True,
    help="Seconds to wait without a sign of progress from the starting daemon before giving up.",
)
@common
def start(options: Options, foreground: bool, timeout: float) -> None:
    """Start the daemon (dmgn-node) for this data dir.

    Asks for the passphrase (or reads --passphrase-file / DMGN_PASSPHRASE), checks it, and hands
    the unlocked key to dmgn-node over a pipe. Commands then go through the daemon.
    """
    dd = options.data_dir
    if not dd.vault.exists():
        raise NotInitialized(f"no identity in {dd.root}; run `dmgn init` first")
    load_config(dd.config)  # a broken config is reported here, not in a log file
    running = daemon.running_daemon(dd)
    if running is not None:
        raise DaemonOwnsDataDir(
            f"dmgn-node is already running for {dd.root} (pid "
            f"{running.get('pid')}); stop it with `dmgn stop`"
        )
    seed, _ = unlock(dd, read_passphrase(options.passphrase_file))
    if foreground:
        daemon.exec_node_foreground(dd, seed)
    process = daemon.spawn_node(dd, seed)

    # What a slow start is doing, for a person watching (not for scripts reading stderr).
    def tell(phase: str) -> None:
        click.echo(f"dmgn-node is {phase}...", err=True)

    watched = sys.stderr.isatty() and not options.as_json
    facts = daemon.wait_until_ready(dd, process, timeout, tell if watched else None)
    if options.as_json:
        emit(options, "start", facts)
        return
    click.echo(f"dmgn daemon started (PID {facts['pid']})")
    click.echo(f"  socket:       {facts['socket']}")
    addrs = facts.get("listen_addrs") or []
    click.echo(f"  listening on: {', '.join(addrs) if addrs else '(no network transport yet)'}")
    if facts.get("listen_note"):
        click.echo(f"  note:         {facts['listen_note']}")
    api_urls = facts.get("api_urls") or []
    if api_urls:
        click.echo(f"  REST API:     {', '.join(api_urls)} (token: dmgn token show)")
    click.echo(f"  log:          {facts['log_file']}")
    if facts.get("metrics_url"):
        click.echo(f"  metrics:      {facts['metrics_url']}")
    click.echo("  to stop:      dmgn stop")
    click.echo("  AI tools:     dmgn mcp")


@main.command()
@click.option(
    "--timeout",
    type=float,
    default=daemon.STOP_TIMEOUT,
    show_default=True,
    help="Seconds to wait for a clean shutdown.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Kill the daemon (SIGKILL) if it has not stopped "
    "within --timeout. Its store stays consistent (every write is committed before "
    "it is acknowledged).",
)
@common
def stop(options: Options, timeout: float, force: bool) -> None:
    """Stop the daemon gracefully (stores flushed, socket removed)."""
    outcome = daemon.stop_node(options.data_dir, timeout, force)
    if options.as_json:
        emit(options, "stop", outcome.to_json())
    elif not outcome.was_running:
        cleaned = (
            f" (removed stale {', '.join(outcome.stale_removed)})" if outcome.stale_removed else ""
        )
        click.echo(f"dmgn-node is not running for {options.data_dir.root}{cleaned}")
    else:
        killed = " (killed: it did not stop in time)" if outcome.how == "SIGKILL" else ""
        click.echo(f"dmgn daemon stopped (PID {outcome.pid}){killed}")


@main.command()
@common
def mcp(options: Options) -> None:
    """Serve MCP on stdin/stdout for an AI tool, forwarding to the running daemon.

    Point your AI tool's MCP configuration at the command `dmgn mcp` (with --data-dir if you
    use a non-default one). Start the daemon first with `dmgn start`.
    """
    try:
        from dmgn.app.mcp_stdio import run_mcp_stdio
    except ImportError as error:
        raise DmgnError(f"MCP support is not available in this install ({error})") from None
    sys.exit(run_mcp_stdio(options.data_dir.root))


@main.group()
def token() -> None:
    """Show or replace the REST API's Bearer token (the file api.token in the data dir)."""


@token.command("show")
@common
def token_show(options: Options) -> None:
    """Print the REST API token (send it as `Authorization: Bearer <token>`)."""
    path = options.data_dir.api_token
    _emit_token(options, read_token(path), path, rotated=False)


@token.command("rotate")
@common
def token_rotate(options: Options) -> None:
    """Make a new REST API token; the old one stops working at once (no restart needed)."""
    dd = options.data_dir
    if not dd.vault.exists():
        raise NotInitialized(f"no identity in {dd.root}; run `dmgn init` first")
    _emit_token(options, create_token(dd.api_token), dd.api_token, rotated=True)


def _emit_token(options: Options, value: str, path: Path, *, rotated: bool) -> None:
    if options.as_json:
        emit(options, "token", {"token": value, "file": str(path), "rotated": rotated})
    else:
        click.echo(value)


@main.command("config")
@common
def show_config(options: Options) -> None:
    """Show the effective configuration (config.json merged with defaults)."""
    config: Config = load_config(options.data_dir.config)
    emit(options, "config", {"data_dir": str(options.data_dir.root), **config.to_json()})


@main.command("retention")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Only show which memories have expired; delete nothing.",
)
@common
def retention(options: Options, dry_run: bool) -> None:
    """Apply the retention policy now: delete memories older than their type's period.

    The policy is `retention` in config.json, e.g. {"conversation": "365d", "document":
    "forever"}; types it does not name are kept forever. Deletes are tombstones that sync to
    every device. A running daemon also applies it every hour.
    """
    emit(options, "retention", execute(options, api.Retention(dry_run=dry_run)))


@main.command("top")
@click.option(
    "--interval", type=float, default=2.0, show_default=True, help="Seconds between updates."
)
@click.option("--once", is_flag=True, help="Show the numbers once and exit.")
@common
def top(options: Options, interval: float, once: bool) -> None:
    """A live view of the node's metrics (memories, adds/s, query latency, peers, sync lag,
    restarts, inboxes); Ctrl-C to leave. With --json, prints the metrics once."""
    from rich.live import Live

    from dmgn.app.top import top_table

    if interval <= 0:
        raise InvalidInput("--interval must be more than 0 seconds")
    dd = options.data_dir
    if not dd.vault.exists():
        raise NotInitialized(f"no identity in {dd.root}; run `dmgn init` first")
    status = execute(options, api.Status())
    if options.as_json or once:
        if options.as_json:
            click.echo(json.dumps(status["metrics"], indent=2))
        else:
            console().print(top_table(status))
        return
    import time

    with Live(top_table(status), console=console(), auto_refresh=False) as live:
        while True:
            time.sleep(interval)
            live.update(top_table(execute(options, api.Status())), refresh=True)


# -- backup and restore (local admin only: nothing here is reachable over MCP) -----------------


@main.command("backup")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    required=True,
    help="File to write the encrypted backup to (must not exist).",
)
@common
def backup_store(options: Options, output: Path) -> None:
    """Back up every memory, link and deletion into one encrypted archive.

    Taken through the daemon while it runs (a consistent snapshot; adds go on meanwhile), else
    directly. Only this identity can read the archive; restore it with `dmgn restore -i FILE`.
    The identity itself is not in it: keep a `dmgn export` too.
    """
    target = output.expanduser().absolute()
    if target.exists():
        raise InvalidInput(f"{target} exists; choose another file name")
    request = api.Backup(path=str(target))
    with _file_progress(options, "backing up", partial_path(target), None):
        response = execute(options, request)
    emit(options, "backup", response)


@main.command("restore")
@click.option(
    "-i",
    "--input",
    "source",
    type=click.Path(path_type=Path),
    default=None,
    help="A backup made by `dmgn backup`.",
)
@click.option(
    "--merge",
    is_flag=True,
    help="Add the archive's memories, links and deletions to what the store holds "
    "(deletions win) instead of replacing the store with the archive.",
)
@click.option(
    "--from-network",
    "from_network",
    is_flag=True,
    help="Rebuild every memory, link and deletion from storage peers (other people's nodes "
    "holding this identity's encrypted shards and feeds), after `dmgn import`.",
)
@click.option(
    "--peers",
    "min_peers",
    type=click.IntRange(1, 64),
    default=3,
    show_default=True,
    help="With --from-network: storage peers to wait for before asking.",
)
@click.option(
    "--wait",
    type=click.FloatRange(1, 600),
    default=30.0,
    show_default=True,
    help="With --from-network: seconds to wait for those peers.",
)
@common
def restore(
    options: Options,
    source: Path | None,
    merge: bool,
    from_network: bool,
    min_peers: int,
    wait: float,
) -> None:
    """Restore the store from a backup archive, or from the network (the daemon must be stopped).

    From an archive: the whole archive is checked first (identity, integrity, counts,
    checksums); a damaged, truncated or foreign archive changes nothing. Then the store is
    replaced (or, with --merge, merged) in one atomic step.

    From the network: connects to the bootstrap peers in config.json, pulls this identity's
    feeds from its mailbox on storage peers and rebuilds each memory from any k of its shards;
    the end report lists what could not be rebuilt. Restore the identity first with
    `dmgn import`.
    """
    dd = options.data_dir
    if from_network:
        if source is not None or merge:
            raise InvalidInput("--from-network takes no -i/--merge; use one kind of restore")
        _restore_from_network(options, min_peers, wait)
        return
    if source is None:
        raise InvalidInput(
            "give -i FILE (a backup made by `dmgn backup`) or --from-network (storage peers)"
        )
    if not source.is_file():
        raise InvalidInput(f"{source} does not exist or is not a file")
    if not dd.vault.exists():
        raise NotInitialized(
            f"no identity in {dd.root}; restore it first with `dmgn import -i IDENTITY_FILE`"
        )
    load_config(dd.config)
    with daemon.offline_access(dd, before="restoring a backup"):
        seed, device_id = unlock(dd, read_passphrase(options.passphrase_file))
        import trio

        from actors.node import restore_archive

        size = source.stat().st_size
        with _file_progress(options, "restoring", None, 2 * size) as advance:
            response = trio.run(
                functools.partial(
                    restore_archive,
                    seed,
                    device_id,
                    dd.root,
                    source.absolute(),
                    merge=merge,
                    progress=lambda phase, done: advance(done + (size if phase == "load" else 0)),
                )
            )
    emit(options, "restore", response)


def _restore_from_network(options: Options, min_peers: int, wait: float) -> None:
    dd = options.data_dir
    if not dd.vault.exists():
        raise NotInitialized(
            f"no identity in {dd.root}; restore it first with `dmgn import -i IDENTITY_FILE`"
        )
    config = load_config(dd.config)
    with daemon.offline_access(dd, before="restoring from the network"):
        seed, device_id = unlock(dd, read_passphrase(options.passphrase_file))
        import trio

        from actors.node import NetworkSettings, restore_from_network
        from wire.websocket import WebSocketNetwork

        with _count_progress(options, "rebuilding memories") as advance:
            response = trio.run(
                functools.partial(
                    restore_from_network,
                    seed,
                    device_id,
                    dd.root,
                    WebSocketNetwork(),
                    settings=NetworkSettings.from_config(config),
                    min_peers=min_peers,
                    wait=wait,
                    progress=advance,
                )
            )
    emit(options, "restore", response)


@contextlib.contextmanager
def _count_progress(options: Options, label: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar of items done out of a total, on stderr (not with --json)."""
    if options.as_json or not sys.stderr.isatty():
        yield lambda done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    columns = (BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@contextlib.contextmanager
def _file_progress(
    options: Options, label: str, watch: Path | None, total: int | None
) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr (not with --json, not when stderr is no terminal).

    Either the caller reports bytes done through the function yielded, or ``watch`` names a
    file whose growing size is the progress (a backup written by the daemon).
    """
    if options.as_json or not sys.stderr.isatty():
        yield lambda done: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )

    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(0.2):
                with contextlib.suppress(OSError):
                    bar.update(task, completed=watch.stat().st_size if watch else 0)

        poller = threading.Thread(target=poll, daemon=True) if watch else None
        if poller:
            poller.start()
        try:
            yield lambda done: bar.update(task, completed=done)
        finally:
            stop.set()
            if poller:
                poller.join()


if __name__ == "__main__":
    main()
