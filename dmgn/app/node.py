"""`dmgn-node`: the long-running node process. Entry-point layer: it wires the actors together.

Lifetime, in order:

1. take the data dir lock (one owner per data dir; see :mod:`dmgn.app.daemon`), or exit saying who
   holds it; remove what a crashed predecessor left (PID file, socket);
2. get the key: from ``--key-fd`` (what `dmgn start` does: 32 bytes over an inherited pipe),
   else a passphrase (``--passphrase-file``, ``DMGN_PASSPHRASE`` or a prompt) and the vault;
3. write the PID file, log to ``logs/dmgn-node.log`` (rotating; and stderr with --foreground);
4. run the actors under one supervisor (:mod:`actors.node`) until SIGTERM/SIGINT, a
   ``daemon.shutdown`` request on the control socket, or an actor crash loop;
5. shut down: cancelling the supervisor stops every actor (the store closes DuckDB, which
   checkpoints; the control actor closes and removes its socket); then the PID file goes and
   the lock is released by the kernel as the process exits.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import click
import trio

from actors.node import (
    NetworkSettings,
    NodeInfo,
    RunningNode,
    open_node,
    start_local_interfaces,
    start_metrics_endpoint,
    start_networking,
)
from actors.runtime import ActorCrashLoop
from dmgn import __version__, api
from dmgn.app.daemon import (
    KEY_BYTES,
    SECRET_ENVIRONMENT,
    START_BEAT,
    clean_stale,
    clear_start_status,
    read_pid,
    release,
    remove_pid_file,
    try_lock,
    write_pid_file,
    write_start_status,
)
from dmgn.app.logs import JsonFormatter
from dmgn.app.unlock import read_passphrase, unlock
from dmgn.config import Config, load_config
from dmgn.errors import (
    DaemonOwnsDataDir,
    DmgnError,
    InvalidInput,
    NotInitialized,
    VaultCorrupt,
)
from dmgn.identity import identity_id, load_or_create_device_id, read_identity_id
from dmgn.paths import DataDir, default_data_dir, write_private
from wire import unwrapped
from wire.websocket import WebSocketNetwork

log = logging.getLogger("dmgn.app.node")

#: Rotating log: 5 MiB a file, 3 old files kept - weeks of normal operation, bounded on disk.
LOG_MAX_BYTES = 5 * 1024 * 1024
LOG_BACKUPS = 3
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def read_key(fd: int) -> bytes:
    """Read the seed `dmgn start` wrote into the pipe, up to EOF, and close the pipe."""
    chunks = []
    try:
        while len(data := os.read(fd, 4096)):
            chunks.append(data)
            if sum(map(len, chunks)) > KEY_BYTES:
                break
    except OSError as error:
        raise InvalidInput(
            f"cannot read the key from file descriptor {fd}: {error.strerror}"
        ) from None
    finally:
        os.close(fd)
    key = b"".join(chunks)
    if len(key) != KEY_BYTES:
        raise InvalidInput(
            f"expected {KEY_BYTES} bytes of key material on --key-fd, got "
            f"{len(key)}; start the daemon with `dmgn start`"
        )
    return key


def check_key(data_dir: DataDir, seed: bytes) -> None:
    """Refuse key material that does not belong to this data dir's identity."""
    expected = read_identity_id(data_dir.vault.read_bytes(), source=data_dir.vault)
    if identity_id(seed) != expected:
        raise VaultCorrupt(f"the key handed to dmgn-node is not the identity of {data_dir.vault}")


def setup_logging(data_dir: DataDir, config: Config, foreground: bool) -> list[logging.Handler]:
    data_dir.log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(data_dir.log_file.parent, 0o700)
    file_handler = logging.handlers.RotatingFileHandler(
        data_dir.log_file, maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS, encoding="utf-8"
    )
    text = logging.Formatter(LOG_FORMAT)
    file_handler.setFormatter(JsonFormatter() if config.log_format == "json" else text)
    handlers: list[logging.Handler] = [file_handler]
    if foreground:
        handlers.append(logging.StreamHandler(sys.stderr))
        handlers[-1].setFormatter(text)  # a person reads this one
    root = logging.getLogger()
    root.setLevel(config.log_level.upper())
    for handler in handlers:
        root.addHandler(handler)
    os.chmod(data_dir.log_file, 0o600)
    return handlers


def describe(
    node: RunningNode,
    data_dir: DataDir,
    listen_note: str | None = None,
    metrics_url: str | None = None,
) -> dict[str, object]:
    """What `dmgn start` prints and `daemon.ping` answers."""
    return {
        "pid": os.getpid(),
        "version": __version__,
        "data_dir": str(data_dir.root),
        "socket": str(data_dir.control_socket),
        "log_file": str(data_dir.log_file),
        "listen_addrs": list(node.info.listen_addrs),
        "listen_note": listen_note,
        "metrics_url": metrics_url,
        "api_urls": list(node.info.api_urls),
        "started_at": node.info.started_at,
        "started_at_rfc3339": api.rfc3339(int(node.info.started_at * 1e9)),
    }


def write_node_addrs(data_dir: DataDir, addrs: list[str]) -> None:
    """Record our reachable addresses in config.json's ``node_addrs`` (like the reference), so
    a person can copy one into another device's ``bootstrap_peers``. The rest of the file is
    kept as it is; nothing is written when the addresses did not change."""
    path = data_dir.config
    try:
        document = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError) as error:
        log.warning("could not record node_addrs in %s: %s", path, error)
        return
    if not isinstance(document, dict) or document.get("node_addrs") == addrs:
        return
    document["node_addrs"] = addrs
    write_private(path, (json.dumps(document, indent=2) + "\n").encode())


class StartProgress:
    """Tells `dmgn start` the daemon is still starting, and doing what, until it is ready:
    a replayed write-ahead log or a re-index can take minutes before the socket answers."""

    def __init__(self, data_dir: DataDir) -> None:
        self._data_dir = data_dir
        self._scope = trio.CancelScope()
        self.phase = "starting"

    async def beat(self) -> None:
        with self._scope:
            while True:
                write_start_status(self._data_dir, self.phase)
                await trio.sleep(START_BEAT)

    def finish(self) -> None:
        self._scope.cancel()
        clear_start_status(self._data_dir)


async def serve(data_dir: DataDir, seed: bytes, device_id: bytes, config: Config) -> None:
    """Run the node until a signal or a shutdown request; return after a clean shutdown."""
    progress = StartProgress(data_dir)
    try:
        # The nursery wraps what _serve raised; run_node (and the person) want the error
        # itself - "cannot listen on ...", a crash loop - not a one-leaf exception tree.
        with unwrapped():
            async with trio.open_nursery() as beats:
                beats.start_soon(progress.beat)
                await _serve(data_dir, seed, device_id, config, progress)
    finally:
        progress.finish()


async def _serve(
    data_dir: DataDir, seed: bytes, device_id: bytes, config: Config, progress: StartProgress
) -> None:
    stop = trio.Event()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        info = NodeInfo(data_dir.root, mode="daemon")
        progress.phase = "opening the store and the search index"
        async with open_node(seed, device_id, data_dir.root, info) as node:
            progress.phase = "going online"
            # Dependency order: each start returns once its actors are ready. Networking first,
            # so our addresses are known and in config.json before anyone can ask; the local
            # sockets last, so a `dmgn` that reaches the control socket finds every actor up.
            online = await start_networking(
                node,
                WebSocketNetwork(),
                NetworkSettings.from_config(config),
                data_dir.root,
                on_addresses=lambda addrs: write_node_addrs(data_dir, list(addrs)),
            )
            write_node_addrs(data_dir, list(online.listen_addrs))
            metrics_url = None
            if config.metrics_addr:
                host, port = await start_metrics_endpoint(node, config.metrics_addr)
                metrics_url = f"http://{host}:{port}/metrics"
            progress.phase = "opening the local sockets"
            await start_local_interfaces(
                node,
                data_dir,
                lambda: describe(node, data_dir, online.listen_note, metrics_url),
                stop.set,
                config=config,
            )
            progress.finish()
            log.info(
                "dmgn-node %s ready (pid %d, socket %s)",
                __version__,
                os.getpid(),
                data_dir.control_socket,
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stop_on_signal, signals, stop)
                await stop.wait()
                nursery.cancel_scope.cancel()
            log.info("shutting down")
            await online.close()
    log.info("stopped cleanly")


async def _stop_on_signal(signals: AsyncIterator[int], stop: trio.Event) -> None:
    async for signum in signals:
        log.info("received %s", signal.Signals(signum).name)
        stop.set()
        return


def run_node(
    data_dir: DataDir, *, key_fd: int | None, passphrase_file: Path | None, foreground: bool
) -> int:
    """The whole process lifetime (see module docstring); returns the exit code."""
    os.umask(0o077)
    if not data_dir.vault.exists():
        raise NotInitialized(f"no identity in {data_dir.root}; run `dmgn init` first")
    config = load_config(data_dir.config)
    lock = try_lock(data_dir)
    if lock is None:
        pid = read_pid(data_dir)
        raise DaemonOwnsDataDir(
            f"the data dir {data_dir.root} is already in use"
            + (f" by dmgn-node (pid {pid})" if pid else "")
            + "; stop it with `dmgn stop` first, or use another --data-dir"
        )
    handlers: list[logging.Handler] = []
    try:
        if key_fd is not None:
            seed = read_key(key_fd)
            check_key(data_dir, seed)
            device_id = load_or_create_device_id(data_dir.device)
        else:
            seed, device_id = unlock(data_dir, read_passphrase(passphrase_file))
            # Children must not inherit it. (/proc/PID/environ still shows the value this
            # process was started with: use --passphrase-file, or `dmgn start`, which never
            # puts it in the daemon's environment.)
            for name in SECRET_ENVIRONMENT:
                os.environ.pop(name, None)
        handlers = setup_logging(data_dir, config, foreground)
        stale = clean_stale(data_dir)
        if stale:
            log.warning(
                "removed files left by a daemon that did not shut down cleanly: %s",
                ", ".join(stale),
            )
        write_pid_file(data_dir)
        try:
            trio.run(serve, data_dir, seed, device_id, config)
        except ActorCrashLoop as error:
            log.error("%s", error)
            raise DmgnError(str(error)) from None
        except DmgnError as error:
            log.error("%s", error)
            raise
        except Exception:  # a bug: its traceback goes to the log file before the process exits
            log.exception("dmgn-node failed")
            raise
        finally:
            remove_pid_file(data_dir)
    finally:
        release(lock)
        for handler in handlers:
            logging.getLogger().removeHandler(handler)
            handler.close()
    return 0


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dmgn-node")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=None,
    envvar="DMGN_DATA_DIR",
    help="Data directory (default: platform config dir, e.g. ~/.config/dmgn; env DMGN_DATA_DIR).",
)
@click.option(
    "--key-fd",
    type=int,
    default=None,
    help="Read the unlocked key from this inherited file descriptor (what `dmgn "
    "start` does). Without it, dmgn-node asks for the passphrase.",
)
@click.option(
    "--passphrase-file",
    type=click.Path(path_type=Path),
    default=None,
    help="Read the passphrase from the first line of FILE (env DMGN_PASSPHRASE also works).",
)
@click.option(
    "--foreground",
    is_flag=True,
    help="Also log to stderr (for running in a terminal or under a service manager).",
)
def main(
    data_dir: Path | None, key_fd: int | None, passphrase_file: Path | None, foreground: bool
) -> None:
    """dmgn-node - the dmgn daemon. Usually started with `dmgn start`, stopped with `dmgn stop`.

    Serves the `dmgn` CLI over a Unix socket in the data dir; stops cleanly on SIGTERM/SIGINT.
    """
    directory = DataDir((data_dir or default_data_dir()).expanduser().absolute())
    try:
        code = run_node(
            directory, key_fd=key_fd, passphrase_file=passphrase_file, foreground=foreground
        )
    except DmgnError as error:
        click.echo(f"dmgn-node: {error}", err=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        click.echo("dmgn-node: interrupted", err=True)
        sys.exit(130)
    except Exception as error:  # a bug or a broken data dir: one line here, the trace in the log
        if os.environ.get("DMGN_DEBUG"):
            raise
        click.echo(
            f"dmgn-node: failed: {type(error).__name__}: {error} (traceback in "
            f"{directory.log_file}; set DMGN_DEBUG=1 to print it here)",
            err=True,
        )
        sys.exit(70)
    sys.exit(code)


if __name__ == "__main__":
    main()
