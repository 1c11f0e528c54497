"""``dmgn mcp``: the stdio endpoint AI tools start, relaying to the running daemon's MCP bridge.

AI tools launch ``{"command": "dmgn", "args": ["mcp"]}`` and speak MCP on its stdin/stdout. The
daemon's bridge (actors/mcp_bridge.py) serves MCP on ``<data_dir>/mcp.sock`` with exactly the
stdio framing (newline-delimited JSON-RPC), so this process is a byte relay, not a second MCP
implementation. Why a relay rather than an SDK proxy (client session to the daemon, server session
to the tool):

* It is protocol-agnostic: whatever the tool and the daemon negotiate (protocol versions,
  sampling, elicitation, notifications, cancellation, future methods) passes through untouched,
  so the relay never lags behind the SDK the daemon runs.
* It starts fast (no pydantic/SDK import) and holds no state: nothing to get out of sync, and
  the daemon stays the one place that validates messages.

Rules: stdout carries protocol bytes only, never logs. If no daemon is running, one line on stderr
says so and the exit status is 2. When the tool closes stdin, the relay half-closes the socket so
the daemon finishes answering, then exits 0 once the daemon closes its side. If the daemon goes
away first, one line on stderr says so and the exit status is 1.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from contextlib import suppress
from pathlib import Path

import trio

from dmgn.paths import DataDir, default_data_dir

__all__ = ["EXIT_DAEMON_LEFT", "EXIT_NO_DAEMON", "main", "relay", "run_mcp_stdio"]

EXIT_NO_DAEMON = 2
EXIT_DAEMON_LEFT = 1

#: Bytes moved per read. MCP messages are mostly small; 64 KiB keeps a 1 MiB memory to a few
#: round trips without holding much memory per direction.
_CHUNK = 65536

_STDIN = 0
_STDOUT = 1


def run_mcp_stdio(data_dir: Path) -> int:
    """Relay this process's stdin/stdout to the daemon's MCP socket; return the exit status."""
    try:
        return trio.run(relay, DataDir(data_dir).mcp_socket, data_dir)
    except KeyboardInterrupt:
        return 130


async def relay(
    socket_path: Path, data_dir: Path, stdin_fd: int = _STDIN, stdout_fd: int = _STDOUT
) -> int:
    """Connect to the bridge and copy bytes both ways until the conversation ends."""
    try:
        stream = await trio.open_unix_socket(os.fspath(socket_path))
    except (FileNotFoundError, ConnectionRefusedError):
        _say(f"no dmgn daemon is running for {data_dir}; start it with `dmgn start`")
        return EXIT_NO_DAEMON
    except OSError as error:
        _say(
            f"cannot reach the dmgn daemon's MCP socket {socket_path}: "
            f"{error.strerror or error}; check that `dmgn start` runs as this user"
        )
        return EXIT_NO_DAEMON

    stdin_done = trio.Event()

    async def tool_to_daemon() -> None:
        while True:
            data = await _read(stdin_fd)
            if not data:
                break
            try:
                await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the daemon left; _daemon_to_tool reports it
        stdin_done.set()
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_eof()

    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(tool_to_daemon)
        tool_left = await _daemon_to_tool(stream, stdout_fd)
        nursery.cancel_scope.cancel()
    if tool_left or stdin_done.is_set():
        return 0
    _say("the dmgn daemon closed the connection (was it stopped?); restart it with `dmgn start`")
    return EXIT_DAEMON_LEFT


async def _daemon_to_tool(stream: trio.SocketStream, stdout_fd: int) -> bool:
    """Copy until the daemon closes; True if it was the tool that went away (stdout closed)."""
    while True:
        try:
            data = await stream.receive_some(_CHUNK)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        if not data:
            return False
        try:
            await trio.to_thread.run_sync(_write_all, stdout_fd, data, abandon_on_cancel=True)
        except BrokenPipeError:
            return True


async def _read(fd: int) -> bytes:
    """One read from a blocking fd in a worker thread (stdin must stay blocking: the AI tool
    shares its file description, and making it non-blocking would leak into the tool)."""
    try:
        return await trio.to_thread.run_sync(os.read, fd, _CHUNK, abandon_on_cancel=True)
    except OSError as error:
        if error.errno in (errno.EBADF, errno.EIO):
            return b""
        raise


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _say(line: str) -> None:
    """One line for the person reading the AI tool's logs; stdout is reserved for protocol."""
    print(f"dmgn mcp: {line}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m dmgn.app.mcp_stdio [--data-dir DIR]`` (the CLI's ``dmgn mcp`` calls
    :func:`run_mcp_stdio` directly)."""
    parser = argparse.ArgumentParser(
        prog="dmgn mcp", description="Relay MCP on stdio to the running dmgn daemon."
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="the node's data directory (default: $DMGN_DATA_DIR or the platform config dir)",
    )
    args = parser.parse_args(argv)
    return run_mcp_stdio(args.data_dir or default_data_dir())


if __name__ == "__main__":
    sys.exit(main())
