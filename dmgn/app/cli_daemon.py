"""`dmgn start`, `stop`, `mcp`: the daemon (dmgn-node); and `token`, `config`, `retention`,
`top`: looking after a node."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from dmgn import api
from dmgn.api_token import create_token, read_token
from dmgn.app import daemon
from dmgn.app.cli_common import Options, common, console, emit, execute
from dmgn.app.unlock import read_passphrase, unlock
from dmgn.config import Config, load_config
from dmgn.errors import DaemonOwnsDataDir, DmgnError, InvalidInput, NotInitialized


@click.command()
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


@click.command()
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


@click.command()
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


@click.group()
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


@click.command("config")
@common
def show_config(options: Options) -> None:
    """Show the effective configuration (config.json merged with defaults)."""
    config: Config = load_config(options.data_dir.config)
    emit(options, "config", {"data_dir": str(options.data_dir.root), **config.to_json()})


@click.command("retention")
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


@click.command("top")
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


#: Registered on the `dmgn` group by dmgn.app.cli.
COMMANDS: tuple[click.Command, ...] = (
    start,
    stop,
    mcp,
    token,
    show_config,
    retention,
    top,
)
