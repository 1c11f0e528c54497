"""Private Unix sockets for the node's local doors (control socket, MCP bridge).

Not an actor: plumbing shared by the two actors that listen on a socket in the data dir, so the
rules are written once - 0600 from bind, a stale socket from a crashed daemon replaced but a live
one never stolen, our own file (and only ours) removed on exit, the peer's uid read from the
kernel, and accept() retried when the process is briefly out of descriptors.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import struct
from contextlib import suppress
from pathlib import Path

import trio

__all__ = [
    "MAX_SOCKET_PATH",
    "accept_stream",
    "listen_private_unix",
    "peer_credentials",
    "remove_if_ours",
]

log = logging.getLogger("dmgn.actors")

#: Linux's sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
#: accept() errors that mean "out of resources for now", not "the listener is broken"; the same
#: set trio.serve_listeners retries on.
_ACCEPT_CAPACITY_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_credentials(sock: trio.socket.SocketType) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end of a connected Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


async def listen_private_unix(
    path: Path, *, backlog: int, what: str
) -> tuple[trio.socket.SocketType, os.stat_result]:
    """Listen at ``path`` (mode 0600); returns the socket and the file's identity.

    ``what`` names the door in error messages ("control socket", "MCP socket").
    """
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise OSError(
            errno.ENAMETOOLONG,
            f"the {what} path {path} is longer than the {MAX_SOCKET_PATH} bytes a Unix "
            "socket allows; use a shorter --data-dir",
        )
    await _clear_stale_socket(path, what)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(os.fspath(path))
        # The data dir is 0700, so nobody else can reach the socket between bind and chmod;
        # 0600 and the peer-uid check are the second and third locks on the door.
        os.chmod(path, 0o600)
        sock.listen(backlog)
        return sock, os.lstat(path)
    except BaseException:
        sock.close()
        raise


async def _clear_stale_socket(path: Path, what: str) -> None:
    """Remove a socket left by a crashed daemon; refuse to steal a live one or delete a file."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(
            f"{path} exists and is not a socket; move it away so the {what} can listen there"
        )
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with probe:
        try:
            await probe.connect(os.fspath(path))
        except (ConnectionRefusedError, FileNotFoundError):
            with suppress(FileNotFoundError):
                os.unlink(path)
            return
    raise OSError(
        errno.EADDRINUSE,
        f"another dmgn node is already serving its {what} at {path}; stop it with `dmgn stop`",
    )


async def accept_stream(listener: trio.socket.SocketType, what: str) -> trio.SocketStream:
    """Accept one connection, backing off while the process is out of descriptors or memory."""
    while True:
        try:
            sock, _ = await listener.accept()
        except OSError as error:
            if error.errno not in _ACCEPT_CAPACITY_ERRORS:
                raise
            log.warning("%s cannot accept connections (%s); retrying shortly", what, error)
            await trio.sleep(0.1)
            continue
        return trio.SocketStream(sock)


def remove_if_ours(path: Path, identity: os.stat_result) -> None:
    """Remove our socket file on exit, unless another node has replaced it since."""
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return
    if (now.st_dev, now.st_ino) == (identity.st_dev, identity.st_ino):
        path.unlink(missing_ok=True)
