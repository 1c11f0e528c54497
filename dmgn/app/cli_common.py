"""What every `dmgn` command shares: the common options (--data-dir, --json,
--passphrase-file), one error line per failure, output (JSON, or rich for people), and running
a :mod:`dmgn.api` request through the daemon when one runs, else in-process.

The commands themselves are in dmgn/app/cli_*.py by group; :mod:`dmgn.app.cli` gathers them.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click

from dmgn import api
from dmgn.app import daemon
from dmgn.app.control_client import daemon_request, run_offline_or_via_daemon
from dmgn.app.unlock import read_passphrase, unlock
from dmgn.config import load_config
from dmgn.errors import DaemonUnavailable, DmgnError
from dmgn.paths import DataDir, default_data_dir

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
