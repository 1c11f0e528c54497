"""`dmgn`: the control CLI.

Every memory command builds a :mod:`dmgn.api` request. If a daemon runs for the data dir, the
request goes through its control socket; otherwise the CLI unlocks the vault, starts the needed
actors in-process, runs the request and stops them. Both paths print the same thing.

Errors are one line on stderr and a non-zero exit code (see :mod:`dmgn.errors`).

This module is the `dmgn` group; the commands are in dmgn/app/cli_*.py by group (identity,
memories, daemon, backup), on top of what they share (:mod:`dmgn.app.cli_common`) and the one
progress bar (:mod:`dmgn.app.cli_progress`).

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

import os

import click

from dmgn import __version__
from dmgn.app import cli_backup, cli_daemon, cli_identity, cli_memories


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dmgn")
def main() -> None:
    """dmgn - an encrypted, decentralized, lifetime memory for AI agents.

    Start with `dmgn init`, add memories with `dmgn add`, search with `dmgn query`.
    Run `dmgn start` for the daemon (sync, MCP); AI tools connect with `dmgn mcp`.
    """
    os.umask(0o077)  # every file a node writes is private to its user


for _group in (cli_identity, cli_memories, cli_daemon, cli_backup):
    for _command in _group.COMMANDS:
        main.add_command(_command)


if __name__ == "__main__":
    main()
