"""`dmgn backup`, `restore`: the store to and from an encrypted archive, or rebuilt from
storage peers. Local admin only: nothing here is reachable over MCP."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from dmgn import api
from dmgn.app import daemon
from dmgn.app.cli_common import Options, common, emit, execute
from dmgn.app.cli_progress import file_progress, progress_bar
from dmgn.app.unlock import read_passphrase, unlock
from dmgn.backup import partial_path
from dmgn.config import load_config
from dmgn.errors import InvalidInput, NotInitialized


@click.command("backup")
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
    with file_progress(options, "backing up", partial_path(target), None):
        response = execute(options, request)
    emit(options, "backup", response)


@click.command("restore")
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
        with file_progress(options, "restoring", None, 2 * size) as advance:
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

        with progress_bar(options, "rebuilding memories", "items", None) as advance:
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


#: Registered on the `dmgn` group by dmgn.app.cli.
COMMANDS: tuple[click.Command, ...] = (
    backup_store,
    restore,
)
